"""mlmtune for Keras users: keras-hub masked-LMs read from, and written as, Hugging Face model folders.

The guide's Keras half (`TFAutoModelForMaskedLM`, `prepare_tf_dataset`, `model.fit`) stopped
working when transformers v5 dropped TensorFlow. These are its steps on Keras 3 and keras-hub,
with mlmtune's blocks and masks, so that a model trained here scores like one trained with
`--backend torch`, and its folder loads in `pipeline("fill-mask")`:

    >>> from mlmtune import keras as mk  # doctest: +SKIP
    >>> model, tokenizer = mk.load_masked_lm("distilbert/distilroberta-base"), mk.load_tokenizer(...)
    >>> mk.compile(model, learning_rate=2e-5, weight_decay=0.01)
    >>> model.fit(mk.masked_dataset(blocks["train"], tokenizer, batch_size=8), epochs=3)
    >>> mk.fill(model, tokenizer, "The Milky Way is a <mask> galaxy.", top_k=3)
    >>> mk.save_pretrained(model, tokenizer, "my_awesome_eli5_mlm_model")

Keras runs on TensorFlow here (`KERAS_BACKEND=tensorflow`); install with `pip install "mlmtune[keras]"`.
keras, keras-hub and tensorflow are an optional dependency: this package imports them inside the
functions that use them, after `require()` has said in one line what is missing.
"""

from __future__ import annotations

import importlib.util
import os
import weakref
from pathlib import Path

import numpy as np

from mlmtune.errors import MlmtuneError
from mlmtune.inference.fill import MASK_SPELLINGS, format_predictions
from mlmtune.keras.convert import build_masked_lm, hf_to_keras, keras_to_hf
from mlmtune.keras.data import masked_dataset, uses_segments
from mlmtune.model.load import load_model
from mlmtune.model.load import load_tokenizer as _load_tokenizer

PACKAGES = {"tensorflow": "tensorflow", "keras": "keras", "keras_hub": "keras-hub"}
_carriers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Keras model -> its Hugging Face twin


def require(what: str = "--backend keras") -> None:
    """Fail in one line, before any work, when Keras, keras-hub or TensorFlow is missing or Keras runs on
    another backend."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow's C++ start-up chatter
    missing = [pip for module, pip in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MlmtuneError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                           f"installed: pip install \"mlmtune[keras]\"")
    try:  # the optional dependency, imported here to say in one line what is wrong with it
        import keras
        import keras_hub  # noqa: F401
    except ImportError as e:
        raise MlmtuneError(f"{what}: keras-hub does not import ({e}); reinstall with "
                           f"pip install \"mlmtune[keras]\"") from None
    if keras.backend.backend() != "tensorflow":
        raise MlmtuneError(f"{what} runs Keras on TensorFlow, but KERAS_BACKEND is {keras.backend.backend()!r}: "
                           f"set KERAS_BACKEND=tensorflow")


def from_hf(hf_model, dtype: str | None = None):
    """The keras-hub twin of a loaded Hugging Face masked-LM, with its weights."""
    model = build_masked_lm(hf_model, dtype=dtype)
    hf_to_keras(hf_model, model)
    _carriers[model] = hf_model
    return model


def load_masked_lm(name: str, dtype: str | None = None):
    """A keras-hub masked-LM (`BertMaskedLM`, `RobertaMaskedLM` or `DistilBertMaskedLM`) from a Hugging Face
    folder or Hub id, head included (a new, seeded one when the folder has none).

    Args:
        name: Hub id, local folder, or `builtin:all-minilm-l6-v2`.
        dtype: Keras dtype policy, e.g. "mixed_bfloat16" (default: float32).

    Returns:
        the Keras model; its inputs are `token_ids`, `padding_mask`, `mask_positions` (and `segment_ids` for
        BERT), its output the logits at the mask positions.
    """
    require("mlmtune.keras")
    hf_model, _ = load_model(name)
    return from_hf(hf_model, dtype)


def load_tokenizer(name: str):
    """The Hugging Face tokenizer of a folder or Hub id (mlmtune's blocks and masks are made with it)."""
    return _load_tokenizer(name)


def loss():
    """Cross-entropy over the masked tokens, averaged over them (not over the padded mask slots)."""
    import keras  # optional dependency

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight")


def optimizer(model, learning_rate=2e-5, weight_decay: float = 0.01, max_grad_norm: float | None = 1.0):
    """AdamW as the Trainer sets it up: betas (0.9, 0.999), eps 1e-8, no decay on biases and LayerNorm,
    gradients clipped to a global norm. `learning_rate` may be a Keras schedule."""
    import keras  # optional dependency

    opt = keras.optimizers.AdamW(learning_rate=learning_rate, weight_decay=weight_decay, beta_1=0.9, beta_2=0.999,
                                 epsilon=1e-8, global_clipnorm=max_grad_norm or None)
    opt.exclude_from_weight_decay(var_list=[v for v in model.trainable_variables if _no_decay(v)])
    return opt


def _no_decay(variable) -> bool:
    name = variable.path.rsplit("/", 1)[-1]
    return name in ("bias", "gamma", "beta") or name.endswith("_bias")


def compile(model, learning_rate=2e-5, weight_decay: float = 0.01, max_grad_norm: float | None = 1.0) -> None:
    """`model.compile` with mlmtune's optimizer and loss; the guide's `AdamWeightDecay(2e-5, weight_decay_rate=0.01)`
    becomes `compile(model, 2e-5, 0.01)`."""
    model.compile(optimizer=optimizer(model, learning_rate, weight_decay, max_grad_norm), loss=loss(),
                  weighted_metrics=[])


def save_pretrained(model, tokenizer, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the Keras model as an ordinary Hugging Face model folder (safetensors, config, tokenizer) that
    `AutoModelForMaskedLM.from_pretrained`, `pipeline("fill-mask")` and `mlmtune fill` load.

    Args:
        model: a model from `load_masked_lm` (it knows which Hugging Face model it is the twin of).
        tokenizer: its tokenizer.
        folder: where to write; it must be empty or new unless `overwrite`.
    """
    hf_model = _carriers.get(model)
    if hf_model is None:
        raise MlmtuneError("save_pretrained takes a model made by mlmtune.keras.load_masked_lm (it needs the "
                           "Hugging Face config the weights go back into)")
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise MlmtuneError(f"{folder} is not empty; pass overwrite=True or choose another folder")
    keras_to_hf(model, hf_model)
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def fill(model, tokenizer, texts: str | list[str], top_k: int = 5):
    """Fill the masks of each text with a Keras model; the top-k is taken at the mask, in Keras, as the
    guide's TensorFlow inference does.

    Returns:
        what `pipeline("fill-mask")` returns for the same texts: for one text with one mask, a list of
        {score, token, token_str, sequence}; a list of those per text when given a list.
    """
    import keras  # optional dependency

    single = isinstance(texts, str)
    results = []
    for text in [texts] if single else texts:
        for spelling in MASK_SPELLINGS:
            text = text.replace(spelling, tokenizer.mask_token)
        ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int32)
        positions = np.flatnonzero(ids == tokenizer.mask_token_id)
        if not len(positions):
            raise MlmtuneError(f"{text!r} has no mask: write {tokenizer.mask_token} where a word is missing")
        x = {"token_ids": ids[None], "padding_mask": np.ones_like(ids)[None],
             "mask_positions": positions[None].astype(np.int32)}
        if uses_segments(tokenizer):
            x["segment_ids"] = np.zeros_like(ids)[None]
        logits = model(x, training=False)[0]  # (masks, V)
        values, indices = keras.ops.top_k(keras.ops.softmax(keras.ops.cast(logits, "float32")), k=top_k)
        results.append(format_predictions(tokenizer, ids.astype(np.int64), keras.ops.convert_to_numpy(values).tolist(),
                                          keras.ops.convert_to_numpy(indices).tolist()))
    return results[0] if single else results


__all__ = ["compile", "fill", "load_masked_lm", "load_tokenizer", "loss", "masked_dataset", "optimizer",
           "save_pretrained"]
