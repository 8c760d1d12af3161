"""Sentence encoders: a model folder that sentence-transformers loads (`modules.json`: Transformer, Pooling,
Normalize, ...), what its modules do to a text, and its files carried into the output of a run.

all-MiniLM-L6-v2, mpnet, bge, e5 and gte are such folders: a Hugging Face encoder at the folder's root (the
Transformer module, path "") and, beside it, how `SentenceTransformer.encode` turns the last layer into one vector
(`1_Pooling/config.json`: mean, first token, max...) and whether it makes it unit length (`Normalize`). A run that
trains the encoder keeps these files, so that `SentenceTransformer(OUTPUT_DIR)` is the same kind of model with the
trained encoder; and the embedding check (`embedding.py`) and the downstream probe embed texts the way the model
does (`SentenceEncoder.pool`).

Only what the embedding check needs is interpreted here: a Transformer module at the root, one of the poolings
mean, cls and max, and Normalize. Anything else (Dense layers, other poolings, custom modules) is still copied
as it is; the check is then left out, with a note that says why.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from mlmtune import hub
from mlmtune.model.load import resolve_model_path

MODULES_FILE = "modules.json"
# the files beside the encoder that belong to sentence-transformers (prompts and similarity are in the last)
ROOT_FILES = (MODULES_FILE, "sentence_bert_config.json", "config_sentence_transformers.json")
POOLINGS = ("mean", "cls", "max")
SIMILARITIES = ("cosine", "dot", "euclidean", "manhattan")
# sentence-transformers' older Pooling configs: one boolean per mode
_LEGACY_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                 "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                 "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass(frozen=True)
class SentenceEncoder:
    """What a sentence-transformers folder holds and how it embeds a text."""

    folder: Path  # where its files are read from
    files: tuple[str, ...]  # its sentence-transformers files and module folders, relative to `folder`
    modules: tuple[str, ...]  # the module types in order (the last part of each `type`)
    pooling: str | None = None  # mean, cls or max; None when `problem` says why the check cannot embed as it does
    normalize: bool = False  # a Normalize module: unit-length embeddings
    max_seq_length: int | None = None  # the Transformer module's truncation (sentence_bert_config.json)
    lowercase: bool = False  # its do_lower_case
    similarity: str = "cosine"  # config_sentence_transformers.json's similarity_fn_name
    prompt: str = ""  # the text its default prompt puts before every input (`encode` without prompt_name)
    problem: str | None = None  # why the embedding check cannot reproduce its embeddings (None: it can)

    def describe(self) -> str:
        """How it embeds, in words: 'mean pooling, normalised'."""
        return f"{self.pooling} pooling" + (", normalised" if self.normalize else "")

    def prepare(self, texts: list[str]) -> list[str]:
        """The texts as its Transformer module tokenizes them: after its default prompt, stripped, lowercased if it
        does."""
        texts = [(self.prompt + t).strip() for t in texts]
        return [t.lower() for t in texts] if self.lowercase else texts

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The sentence embedding of each row, as its Pooling and Normalize modules compute it.

        Args:
            hidden: (B, T, H) the last layer; mask: (B, T) 1 for real tokens, 0 for padding.

        Returns:
            (B, H) float32.
        """
        return pool(hidden, mask, self.pooling or "mean", self.normalize)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool = False) -> torch.Tensor:
    """(B, T, H) last layer and (B, T) attention mask -> (B, H): sentence-transformers' mean (over the real
    tokens), cls (the first token) or max (over the real tokens) pooling, then unit length when `normalize`."""
    hidden = hidden.float()
    weights = mask[..., None].to(hidden.dtype)  # (B, T, 1)
    if mode == "mean":
        out = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    elif mode == "cls":
        out = hidden[:, 0]
    elif mode == "max":
        out = hidden.masked_fill(weights == 0, float("-inf")).max(1).values
    else:
        raise ValueError(f"unknown pooling {mode!r}")
    return F.normalize(out, p=2, dim=1) if normalize else out


def _read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _pooling_mode(config: dict) -> list[str]:
    """The modes of a Pooling config, in sentence-transformers' newer (`pooling_mode`) or older (booleans) form."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        return [mode] if isinstance(mode, str) else list(mode)
    return [m for key, m in _LEGACY_MODES.items() if config.get(key)] or ["mean"]  # as sentence-transformers reads it


def read_encoder(folder: Path) -> SentenceEncoder | None:
    """The sentence-transformers side of a model folder, or None when it has none (no modules.json).

    Never raises for a broken folder: what cannot be read is named in `problem` (one line), the files that are
    there are still listed to be copied, and the embedding check is left out.
    """
    folder = Path(folder)
    if not (folder / MODULES_FILE).is_file():
        return None
    present = tuple(name for name in ROOT_FILES if (folder / name).is_file())
    try:
        modules = _read_json(folder / MODULES_FILE)
        if not isinstance(modules, list) or not all(isinstance(m, dict) and isinstance(m.get("path"), str)
                                                    and isinstance(m.get("type"), str) for m in modules):
            raise ValueError("not a list of modules with a path and a type")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return SentenceEncoder(folder, present, (), problem=f"{folder / MODULES_FILE} cannot be read ({e})")
    paths = [m["path"].strip("/") for m in modules]
    unsafe = [p for p in paths if Path(p).is_absolute() or ".." in Path(p).parts]
    if unsafe:
        return SentenceEncoder(folder, (), (), problem=f"{folder / MODULES_FILE} names a module outside the folder "
                                                       f"({unsafe[0]}): its sentence-transformers files are not kept")
    kinds = tuple(m["type"].rsplit(".", 1)[-1] for m in modules)
    files = present + tuple(p for p in paths if p and (folder / p).exists())
    fields: dict = {"folder": folder, "files": files, "modules": kinds}
    try:
        fields.update(_settings(folder, modules, kinds, paths))
    except _Unusable as e:
        fields["problem"] = str(e)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, AttributeError) as e:
        fields["problem"] = f"a sentence-transformers file of {folder} cannot be read ({e})"
    return SentenceEncoder(**fields)


class _Unusable(Exception):
    """Why the embedding check cannot embed as the model does."""


def _settings(folder: Path, modules: list[dict], kinds: tuple[str, ...], paths: list[str]) -> dict:
    """Pooling, normalisation, truncation, case, similarity and prompt; _Unusable for what the check cannot do."""
    out: dict = {}
    for kind, path in zip(kinds, paths):
        if kind in ("Pooling", "Dense") and not (folder / path / "config.json").is_file():
            raise _Unusable(f"{folder / MODULES_FILE} names the {kind} module {path or '.'}/, and "
                            f"{folder / path / 'config.json'} is missing")
    if not kinds or kinds[0] != "Transformer" or paths[0] != "":
        raise _Unusable(f"the first module of {folder / MODULES_FILE} is not a Transformer at the folder's root "
                        f"(the encoder mlmtune trains)")
    others = [k for k in kinds[1:] if k not in ("Pooling", "Normalize")]
    if others or kinds[1:2] != ("Pooling",):
        raise _Unusable(f"the embedding check computes Transformer, Pooling and Normalize modules; {folder} has "
                        f"{', '.join(kinds)}")
    modes = _pooling_mode(_read_json(folder / paths[1] / "config.json"))
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise _Unusable(f"the embedding check computes {', '.join(POOLINGS)} pooling; {folder / paths[1]} pools by "
                        f"{' + '.join(map(str, modes))}")
    out["pooling"], out["normalize"] = modes[0], "Normalize" in kinds[2:]
    if (folder / "sentence_bert_config.json").is_file():
        sbert = _read_json(folder / "sentence_bert_config.json")
        out["max_seq_length"] = sbert.get("max_seq_length")
        out["lowercase"] = bool(sbert.get("do_lower_case", False))
    if (folder / "config_sentence_transformers.json").is_file():
        st = _read_json(folder / "config_sentence_transformers.json")
        similarity = st.get("similarity_fn_name") or "cosine"
        similarity = {"dot_product": "dot", "cos_sim": "cosine"}.get(similarity, similarity)
        if similarity not in SIMILARITIES:
            raise _Unusable(f"the embedding check scores by {', '.join(SIMILARITIES)}; {folder} by {similarity}")
        out["similarity"] = similarity
        if st.get("default_prompt_name"):
            out["prompt"] = (st.get("prompts") or {}).get(st["default_prompt_name"], "")
    return out


def start_folder(name: str) -> Path | None:
    """The folder of a --model that holds its sentence-transformers files: a local folder or the built-in model
    as it is; for a Hub id, those files fetched into the Hub cache (or found there when offline); None when the
    Hub model has none."""
    path, local = resolve_model_path(name)
    return Path(path) if local else hub.sentence_files(path, ROOT_FILES)


def sentence_encoder(name: str) -> SentenceEncoder | None:
    """`read_encoder` of a --model value (local folder, built-in or Hub id); None for an ordinary model."""
    folder = start_folder(name)
    return read_encoder(folder) if folder is not None else None


def copy_files(encoder: SentenceEncoder, folder: Path) -> None:
    """Copy the encoder's sentence-transformers files and module folders into `folder` (the output being written,
    which holds only what mlmtune wrote): the Transformer module is the folder's root, where the trained weights
    and the (possibly grown) tokenizer are, so nothing in these files changes."""
    for name in encoder.files:
        source, target = encoder.folder / name, folder / name
        if target.exists():  # never over a file mlmtune wrote
            continue
        if source.is_dir():  # the contents (a Hub cache holds links to its blobs), not the permissions
            shutil.copytree(source, target, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(source, target)
