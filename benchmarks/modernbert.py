"""A ModernBERT-shaped model on long blocks: mlmtune's head at the masked positions only against the dense head
(the vocabulary projection at every position, what a model mlmtune has no head layout for gets), in one run.

    python benchmarks/modernbert.py [--steps 12] [--block 512]

A random ModernBERT (6 layers, hidden 384, GLU MLP 1152, vocab 30522 for the quickstart's WordPiece tokenizer;
global attention every third layer, 128-token local windows in the others), trained by `mlmtune train` on the
Python docs in blocks of `--block` tokens, batch 4, each variant in its own process: as shipped (sparse head),
and with ModernBERT taken out of mlmtune's known head layouts (dense head). The first 2 steps are left out of
the timing. Prints a table and writes benchmarks/results/MACHINE/modernbert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_texts, peak_rss_mb, run_child, table, write_json  # noqa: E402

BATCH = 4


def make_model(folder: Path, block: int) -> Path:
    import torch
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from mlmtune.model.load import load_tokenizer

    tok = load_tokenizer("builtin:all-minilm-l6-v2")
    tok.model_max_length = max(block, 512)
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=len(tok), hidden_size=384, intermediate_size=1152, num_hidden_layers=6,
                              num_attention_heads=6, max_position_embeddings=max(block, 512),
                              global_attn_every_n_layers=3, local_attention=128, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                              cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id)
    ModernBertForMaskedLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def child(model: str, corpus: str, block: int, steps: int, dense: bool, out: str) -> dict:
    from mlmtune.config import TrainConfig
    from mlmtune.model import forward
    from mlmtune.options import resolve
    from mlmtune.training.train import train

    if dense:  # as for a model whose head layout mlmtune does not know
        forward.SPARSE_HEADS.pop("ModernBertForMaskedLM")
    cfg = resolve(TrainConfig, {}, {"model": model, "dataset": corpus, "block_size": block, "batch_size": BATCH,
                                    "max_steps": steps, "learning_rate": 1e-3, "output_dir": out,
                                    "cache_dir": out + "-cache", "save_steps": 10**9})
    times: list[float] = []
    result = train(cfg, progress=False, on_step=lambda step, seconds: times.append(seconds))
    m = result.metrics
    return {"step_seconds": times, "peak_rss_mb": peak_rss_mb(), "precision": m["precision"],
            "eval_loss_before": m["eval_loss_before"], "eval_loss_after": m["eval_loss_after"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--dense", action="store_true")
    parser.add_argument("--model")
    parser.add_argument("--corpus")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.corpus, args.block, args.steps, args.dense, args.out)))
        return
    work = Path(tempfile.mkdtemp(prefix="mlmtune-modernbert-"))
    model = make_model(work / "model", args.block)
    corpus = work / "docs.txt"
    corpus.write_text("\n".join(corpus_texts()))
    rows = []
    for name, dense in (("mlmtune, head at the masked positions (as shipped)", False),
                        ("mlmtune, dense head (every position)", True)):
        r = run_child(os.path.abspath(__file__), "--child", "--model", str(model), "--corpus", str(corpus), "--block",
                      str(args.block), "--steps", str(args.steps), "--out", str(work / f"out-{dense}"),
                      *(["--dense"] if dense else []))
        timed = r["step_seconds"][2:]
        rows.append({"variant": name, "tokens_per_s": BATCH * args.block * len(timed) / sum(timed),
                     "peak_rss_gb": r["peak_rss_mb"] / 1024, "precision": r["precision"],
                     "eval_loss_before": r["eval_loss_before"], "eval_loss_after": r["eval_loss_after"]})
    for r in rows:
        r["vs_dense"] = r["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(table(rows, [("variant", "variant", ""), ("tokens_per_s", "tokens/s", ",.0f"), ("vs_dense", "x dense", ".2f"),
                       ("peak_rss_gb", "peak RSS GB", ".2f"), ("precision", "precision", ""),
                       ("eval_loss_before", "eval loss before", ".4f"), ("eval_loss_after", "after", ".4f")]))
    path = write_json("modernbert", {"model": "ModernBERT 6 x 384, GLU 1152, vocab 30522 (random init)",
                                     "block": args.block, "batch": BATCH, "steps": args.steps, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
