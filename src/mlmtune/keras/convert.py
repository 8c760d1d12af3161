"""Hugging Face masked-LM weights <-> keras-hub masked-LM models, both ways, head included.

keras-hub's own converters port a Hugging Face backbone into Keras, one way, and leave the
masked-LM head behind. Training in Keras and publishing a Hugging Face folder needs both ways
and the head, so each family here is one table: (Keras variable, Hugging Face key, how the
tensor turns). The same table reads forwards (`hf_to_keras`) and backwards (`keras_to_hf`), so
a weight cannot be ported one way and forgotten the other.

The PyTorch model stays the carrier of the Hugging Face format: mlmtune loads it as the PyTorch
backend does (hub id or folder, a new seeded head when the folder has none), copies its weights
into Keras, and copies the trained weights back into it to save, evaluate and publish.

Where the two implementations differ, the Keras model is set to compute what the Hugging Face
one does:
- keras-hub's BERT encoder uses the tanh GELU, and every family hard-codes its LayerNorm epsilon;
  both are set from the Hugging Face config.
- RoBERTa's position rows start at 2 (rows 0-1 belong to padding), and its one token-type row is
  added to every token; keras-hub has no token types, so that row is folded into the position
  rows, and written back as zeros (what fairseq's RoBERTa has).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mlmtune.errors import MlmtuneError

ROBERTA_POSITION_OFFSET = 2  # padding_idx + 1: RoBERTa's first real position row


@dataclass(frozen=True)
class Port:
    """One weight: where it lives in Keras and in the Hugging Face state dict, and how it turns.

    kind: "same" (reshape only), "dense" (a Linear weight (out, in), stored by Keras as (in, ...out)),
    "position" (RoBERTa's offset rows plus the folded token-type row).
    """

    keras: object  # a keras.Variable
    hf: str
    kind: str = "same"


def _activation(name: str):
    """The Keras function for a Hugging Face `hidden_act`."""
    import keras  # optional dependency

    exact = {"gelu": lambda x: keras.activations.gelu(x, approximate=False),
             "relu": keras.activations.relu, "silu": keras.activations.silu, "swish": keras.activations.silu}
    tanh = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
    if name in exact:
        return exact[name]
    if name in tanh:
        return lambda x: keras.activations.gelu(x, approximate=True)
    raise MlmtuneError(f"activation {name!r} has no Keras counterpart in mlmtune; use --backend torch")


@dataclass(frozen=True)
class Family:
    """What differs between BERT, RoBERTa and DistilBERT, in Hugging Face and in keras-hub."""

    model_type: str
    prefix: str  # the base model's name in the Hugging Face state dict

    def backbone_args(self, c) -> dict:
        if self.model_type == "distilbert":
            return dict(vocabulary_size=c.vocab_size, num_layers=c.n_layers, num_heads=c.n_heads, hidden_dim=c.dim,
                        intermediate_dim=c.hidden_dim, dropout=c.dropout,
                        max_sequence_length=c.max_position_embeddings)
        args = dict(vocabulary_size=c.vocab_size, num_layers=c.num_hidden_layers, num_heads=c.num_attention_heads,
                    hidden_dim=c.hidden_size, intermediate_dim=c.intermediate_size, dropout=c.hidden_dropout_prob)
        if self.model_type == "roberta":
            return {**args, "max_sequence_length": c.max_position_embeddings - ROBERTA_POSITION_OFFSET}
        return {**args, "max_sequence_length": c.max_position_embeddings, "num_segments": c.type_vocab_size}

    def activation(self, c) -> str:
        return c.activation if self.model_type == "distilbert" else c.hidden_act

    def layer_norm_eps(self, c) -> float:
        return 1e-12 if self.model_type == "distilbert" else c.layer_norm_eps


FAMILIES = {
    "bert": Family("bert", "bert"),
    "roberta": Family("roberta", "roberta"),
    "distilbert": Family("distilbert", "distilbert"),
}


def family_of(hf_model) -> Family:
    """The family of a Hugging Face masked-LM, or a one-line error naming the ones the Keras backend has."""
    model_type = hf_model.config.model_type
    if model_type not in FAMILIES:
        raise MlmtuneError(f"--backend keras supports the {', '.join(sorted(FAMILIES))} families; this model is "
                           f"{model_type!r}: use --backend torch")
    if not getattr(hf_model.config, "tie_word_embeddings", True):
        raise MlmtuneError("--backend keras needs the output projection tied to the input embedding "
                           "(keras-hub's masked-LM head is tied); this model's is not: use --backend torch")
    if getattr(hf_model.config, "sinusoidal_pos_embds", False):
        raise MlmtuneError("--backend keras does not port sinusoidal DistilBERT positions; use --backend torch")
    return FAMILIES[model_type]


def build_masked_lm(hf_model, dtype: str | None = None):
    """An untrained keras-hub masked-LM shaped like `hf_model`, computing what it computes.

    Args:
        hf_model: a transformers `*ForMaskedLM` of the BERT, RoBERTa or DistilBERT family.
        dtype: a Keras dtype policy ("float32", "mixed_bfloat16", ...); None: Keras' default.
    """
    import keras  # optional dependency
    import keras_hub

    family = family_of(hf_model)
    c = hf_model.config
    backbone_cls, lm_cls = {
        "bert": (keras_hub.models.BertBackbone, keras_hub.models.BertMaskedLM),
        "roberta": (keras_hub.models.RobertaBackbone, keras_hub.models.RobertaMaskedLM),
        "distilbert": (keras_hub.models.DistilBertBackbone, keras_hub.models.DistilBertMaskedLM),
    }[family.model_type]
    backbone = backbone_cls(**family.backbone_args(c), dtype=dtype)
    model = lm_cls(backbone=backbone, preprocessor=None)
    if family.model_type == "bert":
        backbone.pooled_dense.trainable = False  # the classification pooler; a masked-LM never uses it

    activation = _activation(family.activation(c))
    for layer in backbone.transformer_layers:
        layer._feedforward_intermediate_dense.activation = activation
    model.masked_lm_head._intermediate_dense.activation = activation
    model.masked_lm_head.intermediate_activation = activation
    eps = family.layer_norm_eps(c)
    for layer in model._flatten_layers():
        if isinstance(layer, keras.layers.LayerNormalization):
            layer.epsilon = eps
    return model


def ports(model, hf_model) -> list[Port]:
    """The table of every ported weight of a keras-hub masked-LM built by `build_masked_lm`."""
    family = family_of(hf_model)
    backbone, head, p = model.backbone, model.masked_lm_head, family.prefix
    table = []
    if family.model_type == "bert":
        table += [Port(backbone.token_embedding.embeddings, f"{p}.embeddings.word_embeddings.weight"),
                  Port(backbone.position_embedding.position_embeddings, f"{p}.embeddings.position_embeddings.weight"),
                  Port(backbone.segment_embedding.embeddings, f"{p}.embeddings.token_type_embeddings.weight")]
    else:
        table += [Port(backbone.token_embedding.embeddings, f"{p}.embeddings.word_embeddings.weight"),
                  Port(backbone.embeddings.position_embedding.position_embeddings,
                       f"{p}.embeddings.position_embeddings.weight",
                       "position" if family.model_type == "roberta" else "same")]
    table += [Port(backbone.embeddings_layer_norm.gamma, f"{p}.embeddings.LayerNorm.weight"),
              Port(backbone.embeddings_layer_norm.beta, f"{p}.embeddings.LayerNorm.bias")]

    if family.model_type == "distilbert":
        names = {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
                 "ln1": "sa_layer_norm", "ff1": "ffn.lin1", "ff2": "ffn.lin2", "ln2": "output_layer_norm"}
        layer_prefix = f"{p}.transformer.layer"
    else:
        names = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
                 "o": "attention.output.dense", "ln1": "attention.output.LayerNorm", "ff1": "intermediate.dense",
                 "ff2": "output.dense", "ln2": "output.LayerNorm"}
        layer_prefix = f"{p}.encoder.layer"
    for i, layer in enumerate(backbone.transformer_layers):
        attention = layer._self_attention_layer
        keras_of = {"q": attention.query_dense, "k": attention.key_dense, "v": attention.value_dense,
                    "o": attention.output_dense, "ff1": layer._feedforward_intermediate_dense,
                    "ff2": layer._feedforward_output_dense}
        for short, dense in keras_of.items():
            table += [Port(dense.kernel, f"{layer_prefix}.{i}.{names[short]}.weight", "dense"),
                      Port(dense.bias, f"{layer_prefix}.{i}.{names[short]}.bias")]
        for short, norm in (("ln1", layer._self_attention_layer_norm), ("ln2", layer._feedforward_layer_norm)):
            table += [Port(norm.gamma, f"{layer_prefix}.{i}.{names[short]}.weight"),
                      Port(norm.beta, f"{layer_prefix}.{i}.{names[short]}.bias")]

    head_names = {"bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
                           "cls.predictions.bias"),
                  "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
                  "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector.bias")}
    dense, norm, bias = head_names[family.model_type]
    table += [Port(head._intermediate_dense.kernel, f"{dense}.weight", "dense"),
              Port(head._intermediate_dense.bias, f"{dense}.bias"),
              Port(head._intermediate_layer_norm.gamma, f"{norm}.weight"),
              Port(head._intermediate_layer_norm.beta, f"{norm}.bias"),
              Port(head._bias, bias)]
    return table


def _token_type_row(hf_model, family: Family) -> np.ndarray | None:
    if family.model_type != "roberta":
        return None
    return hf_model.state_dict()[f"{family.prefix}.embeddings.token_type_embeddings.weight"][0].float().numpy()


def hf_to_keras(hf_model, model) -> None:
    """Copy every weight of the Hugging Face masked-LM into the keras-hub one (built by `build_masked_lm`)."""
    family = family_of(hf_model)
    state = hf_model.state_dict()
    token_type = _token_type_row(hf_model, family)
    for port in ports(model, hf_model):
        source = state[port.hf].detach().float().cpu().numpy()
        shape = tuple(port.keras.shape)
        if port.kind == "dense":
            value = np.reshape(source.T, shape)
        elif port.kind == "position":  # every token adds token-type row 0 too: fold it in
            value = source[ROBERTA_POSITION_OFFSET:ROBERTA_POSITION_OFFSET + shape[0]] + token_type
        else:
            value = np.reshape(source, shape)
        port.keras.assign(value.astype(port.keras.dtype))


@torch.no_grad()
def keras_to_hf(model, hf_model) -> None:
    """Copy every weight of the keras-hub masked-LM back into the Hugging Face one, in place.

    Weights the Hugging Face model ties (the output projection to the input embedding, the decoder
    bias to the head bias) follow, since they are the same tensors.
    """
    family = family_of(hf_model)
    state = hf_model.state_dict()
    for port in ports(model, hf_model):
        target = state[port.hf]
        value = np.asarray(port.keras.numpy(), dtype=np.float32)
        if port.kind == "dense":
            value = np.reshape(value, tuple(target.shape)[::-1]).T
        elif port.kind == "position":
            rows = value.shape[0]
            target[ROBERTA_POSITION_OFFSET:ROBERTA_POSITION_OFFSET + rows].copy_(torch.from_numpy(value))
            continue
        target.copy_(torch.from_numpy(np.ascontiguousarray(np.reshape(value, tuple(target.shape)))))
    if family.model_type == "roberta":  # folded into the position rows
        state[f"{family.prefix}.embeddings.token_type_embeddings.weight"][0].zero_()
