"""Evaluation in true fp32 against evaluation under bf16 autocast (`--eval-precision fp32` and its default), on
this machine, measured by the same child that `benchmarks/gpu.py` runs on a GPU.

    python benchmarks/eval_precision.py                  # DistilRoBERTa-shaped, 128 blocks of 128 tokens
    python benchmarks/eval_precision.py --eval-blocks 512

A DistilRoBERTa-shaped masked-LM (6 layers, hidden 768, vocab 50265, random init) scores the same fixed masks
of `--eval-blocks` blocks of the Python docs both ways (each after a warm-up of two batches), and a bf16
training step on blocks of the same shape is timed, so the evaluation's cost reads in training steps too. On a
CPU without fast bf16 (no AVX-512 bf16 or AMX) bf16 autocast is slower, and `--precision auto` trains and
evaluates in fp32 there anyway. The loss difference of a random-init model (near-uniform predictions) says
little about a trained one's: it only shows both scored the same masks. Writes
benchmarks/results/MACHINE/eval_precision.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_child, write_json  # noqa: E402
from gpu import make_model_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16, help="blocks per forward pass and per training step")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--tokenizer", default="builtin:all-minilm-l6-v2")
    parser.add_argument("--note", default="", help="said with the figures, e.g. that the machine was shared")
    parser.add_argument("--results", type=Path, help="where eval_precision.json goes")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mlmtune-eval-precision-"))
    model_dir = make_model_dir(work / "model", args.tokenizer, smoke=False)
    e = run_child(str(Path(__file__).resolve().parent / "gpu.py"), "--child", "eval", "--model-dir", str(model_dir),
                  "--batch", str(args.batch), "--block-size", str(args.block_size), "--eval-blocks",
                  str(args.eval_blocks))
    print(f"evaluation of {e['blocks']} blocks of {args.block_size} tokens at batch {e['batch']} on the {e['device']}: "
          f"fp32 {e['fp32_s']:.1f} s ({e['fp32_eval_in_train_steps']:.2f}x the time bf16 training takes over as many "
          f"blocks), bf16 autocast {e['bf16_autocast_s']:.1f} s ({e['speedup']:.2f}x faster, "
          f"{e['bf16_eval_in_train_steps']:.2f}x); eval loss {e['fp32_loss']:.4f} fp32 against {e['bf16_loss']:.4f} "
          f"bf16 (relative difference {e['loss_rel_diff']:.1e}, {e['masked_tokens']:,} masked tokens)")
    path = write_json("eval_precision", {
        "model": "RoBERTa 6x768, vocab 50265 (random init)", "block": args.block_size, "note": args.note,
        "timing": "one pass over the blocks after a two-batch warm-up; training: median of steps 3-6",
        "evaluation": e}, args.results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
