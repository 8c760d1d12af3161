"""Comparisons with independent references, shared by the tests: transformers' pipeline("fill-mask"), the weights
of a reference run, and the updates of a run that summed the same terms in another order; and the smallest real
change that such a comparison must still see (one token of one mask)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def assert_same_as_pipeline(ours, theirs):
    """Same tokens, token strings and sequences in the same order; scores equal to float32 precision.

    Works on one text's result (a list of predictions, or a list per mask) and recurses into lists.
    """
    if theirs and isinstance(theirs[0], list):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            assert_same_as_pipeline(a, b)
        return
    assert [(p["token"], p["token_str"], p["sequence"]) for p in ours] == \
        [(p["token"], p["token_str"], p["sequence"]) for p in theirs]
    assert [p["score"] for p in ours] == pytest.approx([p["score"] for p in theirs], rel=1e-4, abs=1e-7)


def assert_same_weights(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """The model.safetensors of `folder` holds `weights`, bit for bit: a resumed run repeats the uninterrupted run's
    sums in the same order (the same kernels and threads, masks and dropout from the step, weights and AdamW moments
    saved whole), so nothing may differ, on any CPU."""
    from safetensors.torch import load_file

    got = load_file(str(folder / "model.safetensors"))
    assert got.keys() == weights.keys()
    for k in weights:
        assert torch.equal(got[k], weights[k]), f"{k}: {float((got[k] - weights[k]).abs().max()):.3g} apart"


# How far two runs that sum the same terms in another order may end apart, in units of what their steps moved each
# tensor (`update_difference`): 8 to 11 times the most measured on AVX-512, AVX2 and SSE4.1 kernels, with one and two
# threads; one token masked otherwise lands 1.4 and 2.6 apart, over 200x beyond (docs/development.md#what-is-exact).
RESUMED_BOUND = 1e-4  # resumed with the run's AdamW moments: one ulp of the largest weights (measured up to 1.3e-5)
RANKS_BOUND = 1e-2  # over the ranks through the encoder's first AdamW steps after the head's (measured up to 8.9e-4)


def zero_gradient(name: str) -> bool:
    """A parameter whose gradient is zero in exact arithmetic: an attention's key bias adds q.b to all of a query's
    scores, which the softmax takes away. What rounding leaves of its gradient (5e-13 here, against 2e-3 for the
    value bias) AdamW still turns into steps (lr x g / (|g| + eps)), so the bias holds rounding noise only, and two
    orders of summation hold different noise: measured 1.8e-6 apart for biases of 2.6e-6. No bound on it follows."""
    return name.endswith(("attention.self.key.bias", "attention.k_lin.bias"))


def update_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                      start: dict[str, torch.Tensor]) -> tuple[float, str]:
    """How far two runs from the same start ended apart, in units of how far the steps moved the weights:
    max|got - want| / max|want - start|, tensor by tensor, and the worst tensor's name. Tensors with a zero exact
    gradient (`zero_gradient`) and tied copies that `start` stores once are left out."""
    assert got.keys() == want.keys()
    worst, name = 0.0, ""
    for k in want:
        if k not in start or zero_gradient(k):
            continue
        apart = float((got[k] - want[k]).abs().max())
        moved = float((want[k] - start[k]).abs().max())
        ratio = apart / moved if moved > 0 else (0.0 if apart == 0 else float("inf"))
        if ratio > worst or not name:
            worst, name = ratio, k
    assert name, "no tensor to compare"
    return worst, name


def assert_same_updates(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                        bound: float) -> float:
    """`got` made `want`'s updates from `start` up to the order of float sums: `update_difference` <= bound.
    Returns the difference, for the caller to set a real change against."""
    worst, name = update_difference(got, want, start)
    assert worst <= bound, f"{name}: {worst:.3g} of its update apart (bound {bound:g})"
    return worst


def unmask_one_token(monkeypatch) -> dict[str, int]:
    """From now on, the first micro-batch that training masks predicts one token fewer: its first masked position
    gets its token back and no label. The smallest real change to a run's data; returns a counter of the
    micro-batches masked since, to check that the change was made."""
    from mlmtune.data.masking import IGNORE_INDEX
    from mlmtune.training import feed

    real = feed.StepBatches.mask
    calls = {"n": 0}

    def mask(self, micro):
        out = real(self, micro)
        if calls["n"] == 0:
            inputs, labels = (t.clone() for t in out[0])
            b, t = (labels != IGNORE_INDEX).nonzero()[0].tolist()
            inputs[b, t], labels[b, t] = micro[0][0][b, t], IGNORE_INDEX
            out[0] = (inputs, labels)
        calls["n"] += 1
        return out

    monkeypatch.setattr(feed.StepBatches, "mask", mask)
    return calls
