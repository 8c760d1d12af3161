"""Comparisons with independent references, shared by the tests: transformers' pipeline("fill-mask"), and
the weights of a reference run."""

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


def assert_same_weights(folder: Path, weights: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    """The model.safetensors of `folder` holds `weights`, tensor by tensor."""
    from safetensors.torch import load_file

    got = load_file(str(folder / "model.safetensors"))
    assert got.keys() == weights.keys()
    for k in weights:
        torch.testing.assert_close(got[k], weights[k], rtol=0, atol=atol, msg=k)
