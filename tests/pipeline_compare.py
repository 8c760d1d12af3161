"""Comparison with transformers' pipeline("fill-mask"), shared by the fill, CLI and server tests."""

from __future__ import annotations

import pytest


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
