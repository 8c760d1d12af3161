"""The sparse head gives the dense head's loss and gradients, for every architecture it claims."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from mlmtune.data.masking import IGNORE_INDEX, Masker
from mlmtune.model.forward import freeze_encoder, has_sparse_head, logits_where, masked_nll_sum

pytestmark = pytest.mark.numerics

TINY = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=80)


def _models():
    yield transformers.BertForMaskedLM(transformers.BertConfig(**TINY))
    yield transformers.RobertaForMaskedLM(transformers.RobertaConfig(**TINY, pad_token_id=1))
    yield transformers.XLMRobertaForMaskedLM(transformers.XLMRobertaConfig(**TINY, pad_token_id=1))
    yield transformers.DistilBertForMaskedLM(transformers.DistilBertConfig(
        vocab_size=300, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=80))
    yield transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, global_attn_every_n_layers=2, local_attention=16, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, cls_token_id=0, sep_token_id=2))
    yield transformers.EuroBertForMaskedLM(transformers.EuroBertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=80, pad_token_id=1, bos_token_id=0, eos_token_id=2, mask_token_id=4))
    yield transformers.ElectraForMaskedLM(transformers.ElectraConfig(**TINY, embedding_size=32))  # dense path


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (4, 48), generator=g)
    ids[:, 0] = 0
    masker = Masker(mask_token_id=4, vocab_size=300, special_ids=torch.tensor([0, 1, 2, 3, 4]), mlm_probability=0.15)
    return masker(ids, g)


@pytest.mark.parametrize("model", list(_models()), ids=lambda m: type(m).__name__)
def test_sparse_loss_and_gradients_equal_the_dense_computation(model):
    torch.manual_seed(0)
    model.eval()  # no dropout, so both passes compute the same function
    inputs, labels = _batch()

    nll, count = masked_nll_sum(model, inputs, labels)
    (nll / count).backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    dense_logits = model(input_ids=inputs).logits  # (B, T, V): the ordinary forward
    dense = F.cross_entropy(dense_logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                            reduction="sum")
    (dense / count).backward()

    assert count == int((labels != IGNORE_INDEX).sum()) > 0
    torch.testing.assert_close(nll, dense, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_common_architectures_take_the_sparse_path():
    names = [type(m).__name__ for m in _models() if has_sparse_head(m)]
    assert names == ["BertForMaskedLM", "RobertaForMaskedLM", "XLMRobertaForMaskedLM", "DistilBertForMaskedLM",
                     "ModernBertForMaskedLM", "EuroBertForMaskedLM"]


def test_logits_where_respects_the_attention_mask():
    model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**TINY, pad_token_id=1)).eval()
    ids = torch.tensor([[0, 7, 4, 9, 2, 1, 1], [0, 4, 8, 9, 10, 11, 2]])
    attention = (ids != 1).long()
    where = ids == 4
    with torch.no_grad():
        sparse = logits_where(model, ids, where, attention)
        dense = model(input_ids=ids, attention_mask=attention).logits[where]
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)


def test_models_use_sdpa_attention(tiny):
    model, _ = tiny
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_frozen_lower_layers_cost_no_backward_and_leave_the_upper_gradients_unchanged(family):
    """--freeze-layers 1 on 3 layers: the upper layers' and the head's gradients equal a full backward's, the tied
    decoder's equals its gradient from the head's side alone (the input embedding fed in detached), and the
    embeddings and layer 0 get none."""
    config = dict(TINY, num_hidden_layers=3)
    model = (transformers.BertForMaskedLM(transformers.BertConfig(**config)) if family == "bert" else
             transformers.RobertaForMaskedLM(transformers.RobertaConfig(**config, pad_token_id=1)))
    model.eval()
    inputs, labels = _batch()
    tied = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is tied

    nll, count = masked_nll_sum(model, inputs, labels)  # the full backward, nothing frozen
    (nll / count).backward()
    full = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    logits = model(inputs_embeds=tied.detach()[inputs]).logits  # the tied matrix reached from the head only
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").div(
        count).backward()
    head_side = tied.grad.clone()
    model.zero_grad(set_to_none=True)

    freeze_encoder(model, False, lower_layers=1)
    nll, count = masked_nll_sum(model, inputs, labels)
    (nll / count).backward()
    base = model.base_model_prefix
    for name, p in model.named_parameters():
        lower = name.startswith((f"{base}.embeddings.", f"{base}.encoder.layer.0."))
        if p is tied:
            torch.testing.assert_close(p.grad, head_side, rtol=1e-4, atol=1e-6)
        elif lower:
            assert p.grad is None, name
        else:
            torch.testing.assert_close(p.grad, full[name], rtol=1e-4, atol=1e-6, msg=name)
    freeze_encoder(model, False)  # unfrozen again: the hook is gone and every parameter trains
    assert model._mlmtune_detach is None and all(p.requires_grad for p in model.parameters())
