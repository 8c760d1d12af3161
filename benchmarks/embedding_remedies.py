"""What masked-LM training does to a sentence encoder's embeddings, and what keeps them, measured on the quickstart
(all-MiniLM-L6-v2, a new head, builtin:python-docs).

Every row is `mlmtune quickstart` at a fixed number of optimizer steps (`--max-steps`, no time budget, so that the
rows compare the same steps whatever else the machine runs), general check off, with the remedy's flags:

- default: the quickstart's recipe (lr 1e-3, head warm-up at 3e-3);
- lr1e-4, lr2e-5: a lower learning rate for the whole-model steps (the head warm-up as in the default);
- freeze4: `--freeze-layers 4`: the embeddings and the 4 lowest of the 6 layers stay as loaded;
- head-only: every step trains the new head alone (`--head-warmup-steps` = the steps), the encoder frozen; the
  head's decoder is tied to the input embedding, which trains with it: what the head alone gives;
- contrastive: the default's output, then a short contrastive stage with sentence-transformers (SimCSE: each
  training-split paragraph is its own positive, dropout makes the two views differ; in-batch negatives,
  MultipleNegativesRankingLoss, 1 epoch, batch 32, lr 3e-5, max_seq_length 128), the trained encoder written back
  into the masked-LM folder (the head as the MLM run left it), then `mlmtune eval` on the run's own held-out split.

The embedding check is the run's own (`mlmtune.evaluation.embedding`); "perplexity gain kept" is the variant's fall
of the eval loss over the default's (1.0: all of it).

    python benchmarks/embedding_remedies.py --steps 150 --variants default lr1e-4 lr2e-5 freeze4 head-only contrastive
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write_json  # noqa: E402

# name -> flags over the quickstart's defaults ("contrastive" continues from the default's output)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "lr1e-4": ["--learning-rate", "1e-4"],
    "lr2e-5": ["--learning-rate", "2e-5"],
    "freeze4": ["--freeze-layers", "4"],
    "head-only": ["--head-warmup-steps", "{steps}"],
    "contrastive": [],
}
SEED = 42


def quickstart(variant: str, steps: int, work: Path) -> tuple[dict, Path]:
    out = work / variant
    cmd = [sys.executable, "-m", "mlmtune.cli", "quickstart", "--output-dir", str(out), "--seed", str(SEED),
           "--time-budget", "none", "--max-steps", str(steps), "--general-eval", "none",
           *(flag.format(steps=steps) for flag in VARIANTS[variant])]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    print(done.stdout, file=sys.stderr)
    return json.loads((out / "metrics.json").read_text()), out


def contrastive_stage(folder: Path) -> float:
    """SimCSE on the training split, through sentence-transformers; the encoder written back into `folder`'s
    masked-LM. Returns its seconds."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers.losses import MultipleNegativesRankingLoss
    from sentence_transformers.training_args import SentenceTransformerTrainingArguments
    from transformers import AutoModelForMaskedLM

    from mlmtune.config import DataConfig
    from mlmtune.data.text import load_texts

    texts = list(load_texts(DataConfig(dataset="builtin:python-docs"), SEED)["train"]["text"])
    model = SentenceTransformer(str(folder), device="cpu")
    model.max_seq_length = min(128, model.max_seq_length)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(folder / "contrastive-tmp"), num_train_epochs=1, per_device_train_batch_size=32,
        learning_rate=3e-5, warmup_ratio=0.1, seed=SEED, report_to="none", save_strategy="no", logging_steps=10,
        disable_tqdm=True)
    trainer = SentenceTransformerTrainer(model=model, args=args, loss=MultipleNegativesRankingLoss(model),
                                         train_dataset=Dataset.from_dict({"anchor": texts, "positive": texts}))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    shutil.rmtree(folder / "contrastive-tmp", ignore_errors=True)
    mlm = AutoModelForMaskedLM.from_pretrained(folder)
    missing = mlm.base_model.load_state_dict(model[0].auto_model.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    mlm.save_pretrained(folder)
    return seconds


def evaluate(folder: Path) -> dict:
    """The run's own held-out perplexity, cloze and embedding check, of the model in `folder`."""
    from mlmtune.config import EvalConfig
    from mlmtune.evaluation.evaluate import run_eval
    from mlmtune.options import resolve

    cfg = resolve(EvalConfig, {}, {"model": str(folder), "dataset": "builtin:python-docs", "cloze_words": "python",
                                   "embedding_eval": "auto", "downstream": "builtin:python-docs-chapters",
                                   "downstream_max_examples": 600})
    return run_eval(cfg, progress=False)


def row(variant: str, m: dict, default: dict | None, steps: int) -> dict:
    base = default or m
    gain = (m["eval_loss_before"] - m["eval_loss_after"]) / (base["eval_loss_before"] - base["eval_loss_after"])
    flags = " ".join(VARIANTS[variant]).format(steps=steps)
    return {"variant": variant, "flags": flags or ("default, then SimCSE" if variant == "contrastive" else
                                                   "(the defaults)"),
            "steps": m["train_steps"], "perplexity_before": m["perplexity_before"],
            "perplexity_after": m["perplexity_after"], "gain_kept": gain,
            "mrr10_before": m["embedding_mrr10_before"], "mrr10_after": m["embedding_mrr10_after"],
            "recall1_before": m["embedding_recall1_before"], "recall1_after": m["embedding_recall1_after"],
            "cloze_top3_after": m.get("cloze_top3_after"),
            "downstream_accuracy_after": m.get("downstream_accuracy_after"),
            "train_seconds": m["train_seconds"], "extra_seconds": m.get("extra_seconds")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    variants = ["default", *[v for v in args.variants if v != "default"]]  # the others compare with it
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for variant in variants:
            if variant == "contrastive":
                folder = work / "contrastive"
                shutil.copytree(work / "default", folder, ignore=shutil.ignore_patterns("checkpoints"))
                seconds = contrastive_stage(folder)
                e = evaluate(folder)
                d = runs["default"]
                m = {**d, "eval_loss_after": e["eval_loss"], "perplexity_after": e["perplexity"],
                     "embedding_mrr10_after": e["embedding_mrr10"], "embedding_recall1_after": e["embedding_recall1"],
                     "cloze_top3_after": e.get("cloze_top3"), "downstream_accuracy_after": e.get("downstream_accuracy"),
                     "extra_seconds": seconds}
            else:
                m, _ = quickstart(variant, args.steps, work)
            runs[variant] = m
            rows.append(row(variant, m, runs.get("default"), args.steps))
            print(json.dumps(rows[-1]), file=sys.stderr)
    print(table(rows, [("variant", "variant", ""), ("flags", "flags", ""), ("steps", "steps", ".0f"),
                       ("perplexity_after", "perplexity after", ",.1f"), ("gain_kept", "loss fall kept", ".0%"),
                       ("mrr10_before", "MRR@10 before", ".3f"), ("mrr10_after", "MRR@10 after", ".3f"),
                       ("recall1_after", "recall@1 after", ".1%"), ("cloze_top3_after", "cloze top-3", ".1%"),
                       ("downstream_accuracy_after", "probe accuracy", ".1%")]))
    keep = ("perplexity_before", "perplexity_after", "eval_loss_before", "eval_loss_after", "train_steps",
            "head_warmup_steps", "train_seconds", "precision", "embedding_texts", "embedding_short_texts",
            "embedding_pooling")
    payload = {"steps": args.steps, "seed": SEED, "rows": rows,
               "runs": {v: {k: m.get(k) for k in keep} for v, m in runs.items()}}
    print(write_json(args.out or "embedding_remedies", payload))


if __name__ == "__main__":
    main()
