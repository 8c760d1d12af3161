"""Training throughput: the guide's own pipeline against `mlmtune train`, in one run.

    python benchmarks/train_throughput.py [--steps 20] [--parity-steps 60]

Variants, each in its own process (so peak memory is its own), on the same DistilRoBERTa-shaped
model (6 layers, hidden 768, vocab 50265, random init), the same data (the Python docs,
tokenized with the quickstart tokenizer), the same steps and batch 8 x 128 tokens:

- guide: the guide as written: its preprocess_function, `sum`-based group_texts, batched maps
  with num_proc=4, DataCollatorForLanguageModeling(0.15), Trainer with its TrainingArguments
  (lr 2e-5, weight decay 0.01, per-device batch 8), fp32.
- trainer_bf16: the same with `bf16=True`: the best-tuned Trainer.
- mlmtune_fp32: `mlmtune train --precision fp32` (sparse head, fp32).
- mlmtune: `mlmtune train` as shipped (sparse head, bf16 autocast where fast).

Then a parity check on a pretrained model (the quickstart's MiniLM, which has no MLM head: each side
starts from the same new one): the guide pipeline (fp32), mlmtune with the guide's recipe
(`--head-warmup-steps 0`: only the computation differs) and mlmtune as shipped (its head warm-up)
train the same steps from the same start, and the final models are scored by the same fp32
fixed-mask perplexity. Prints a table and writes benchmarks/results/MACHINE/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import corpus_texts, matmul_peak, peak_rss_mb, run_child, table, write_json  # noqa: E402
from _guide import make_group_texts, make_preprocess_function  # noqa: E402

BATCH, BLOCK = 8, 128


def make_model_dir(folder: Path) -> Path:
    """A random-init DistilRoBERTa-shaped masked-LM with the quickstart tokenizer."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    from mlmtune.model.load import load_tokenizer

    tok = load_tokenizer("builtin:all-minilm-l6-v2")
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50265, hidden_size=768, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=514, pad_token_id=tok.pad_token_id,
                        type_vocab_size=1)
    RobertaForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_corpus(path: Path, repeat: int) -> Path:
    """ELI5-shaped JSONL: the text sits in a nested `answers.text` list, as the guide's data does."""
    with path.open("w") as f:
        for t in corpus_texts(repeat):
            f.write(json.dumps({"answers": {"text": [t]}}) + "\n")
    return path


def model_flops_per_token(cfg, sparse: bool, mlm_probability: float = 0.15) -> float:
    """Training FLOPs per token (forward + backward = 6 x matmul params, plus attention scores)."""
    h, layers, v, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    encoder = layers * (4 * h * h + 2 * h * ff)
    attention = layers * 2 * BLOCK * h  # QK^T and AV per token
    head = h * h + h * v
    return 6 * encoder + 6 * attention + 6 * head * (mlm_probability if sparse else 1.0)


# ---------------------------------------------------------------------------------------------
# children


def child_guide(model_dir: str, corpus: str, steps: int, bf16: bool, lr: float, out: str, seed: int) -> dict:
    """The guide's pipeline, as written, with max_steps and timing added."""
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    eli5 = load_dataset("json", data_files=corpus, split="train")
    eli5 = eli5.train_test_split(test_size=0.2, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eli5 = eli5.flatten()

    preprocess_function = make_preprocess_function(tokenizer)

    tokenized_eli5 = eli5.map(preprocess_function, batched=True, num_proc=4, remove_columns=eli5["train"].column_names)
    block_size = BLOCK

    group_texts = make_group_texts(block_size)

    lm_dataset = tokenized_eli5.map(group_texts, batched=True, num_proc=4)
    data_collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_pretrained(model_dir)

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t)

    training_args = TrainingArguments(
        output_dir=out, eval_strategy="epoch", learning_rate=lr, num_train_epochs=3, weight_decay=0.01,
        push_to_hub=False, per_device_train_batch_size=BATCH, max_steps=steps, bf16=bf16, report_to=[],
        save_strategy="no", disable_tqdm=True, seed=seed, use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=training_args, train_dataset=lm_dataset["train"],
                      eval_dataset=lm_dataset["test"], data_collator=data_collator, processing_class=tokenizer,
                      callbacks=[Timer()])
    trainer.train()
    trainer.save_model(out)
    return {"step_seconds": step_times, "peak_rss_mb": peak_rss_mb()}


def child_mlmtune(model_dir: str, corpus: str, steps: int, precision: str, lr: float, out: str, seed: int,
                  head_warmup: int | None = None) -> dict:
    from mlmtune.config import TrainConfig
    from mlmtune.options import resolve
    from mlmtune.training.train import train

    cfg = resolve(TrainConfig, {}, {"model": model_dir, "dataset": corpus, "text_field": "answers.text",
                                    "batch_size": BATCH, "max_steps": steps, "learning_rate": lr,
                                    "precision": precision,
                                    "output_dir": out, "seed": seed, "cache_dir": out + "-cache",
                                    "save_steps": 10**9, "head_warmup_steps": head_warmup})
    step_times: list[float] = []
    result = train(cfg, progress=False, on_step=lambda step, seconds: step_times.append(seconds))
    return {"step_seconds": step_times, "peak_rss_mb": peak_rss_mb(), "precision": result.metrics["precision"]}


def child_score(model_dir: str, corpus: str, seed: int) -> dict:
    """fp32 fixed-mask perplexity of a model folder on the corpus' held-out split (20%, the guide's and
    mlmtune's; named explicitly so that every model, trained by mlmtune or not, is scored on it)."""
    from mlmtune.config import EvalConfig
    from mlmtune.evaluation.evaluate import run_eval
    from mlmtune.options import resolve

    cfg = resolve(EvalConfig, {}, {"model": model_dir, "dataset": corpus, "text_field": "answers.text",
                                   "seed": seed, "test_size": 0.2, "cache_dir": model_dir + "-evalcache"})
    return run_eval(cfg)


# ---------------------------------------------------------------------------------------------


def tokens_per_second(step_seconds: list[float], skip: int) -> float:
    timed = step_seconds[skip:] or step_seconds
    return BATCH * BLOCK * len(timed) / sum(timed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", type=int, default=3, help="warm-up steps left out of the timing")
    parser.add_argument("--parity-steps", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the Python docs in the corpus")
    parser.add_argument("--child", choices=["guide", "mlmtune", "score"])
    parser.add_argument("--model-dir")
    parser.add_argument("--corpus")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--out")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--head-warmup-steps", type=int, help="mlmtune's --head-warmup-steps (default: its own)")
    args = parser.parse_args()
    if args.child == "guide":
        result = child_guide(args.model_dir, args.corpus, args.steps, args.precision == "bf16", args.lr, args.out,
                             args.seed)
    elif args.child == "mlmtune":
        result = child_mlmtune(args.model_dir, args.corpus, args.steps, args.precision, args.lr, args.out, args.seed,
                               args.head_warmup_steps)
    elif args.child == "score":
        result = child_score(args.model_dir, args.corpus, args.seed)
    if args.child:
        print(json.dumps(result))
        return

    import torch
    from transformers import AutoConfig

    work = Path(tempfile.mkdtemp(prefix="mlmtune-bench-"))
    model_dir = make_model_dir(work / "distilroberta-shaped")
    corpus = write_corpus(work / "corpus.jsonl", args.repeat)
    cfg = AutoConfig.from_pretrained(model_dir)
    me = os.path.abspath(__file__)
    peak_bf16, peak_fp32 = matmul_peak(torch.bfloat16), matmul_peak(torch.float32)

    def child(kind: str, model: Path | str, steps: int, precision: str, lr: float, out: Path, *extra: str) -> dict:
        return run_child(me, "--child", kind, "--model-dir", str(model), "--corpus", str(corpus), "--steps",
                         str(steps), "--precision", precision, "--lr", str(lr), "--out", str(out), *extra)

    variants = [
        ("guide (Trainer, fp32, as written)", "guide", "fp32", False),
        ("Trainer bf16=True", "guide", "bf16", False),
        ("mlmtune --precision fp32", "mlmtune", "fp32", True),
        ("mlmtune (auto: bf16, sparse head)", "mlmtune", "auto", True),
    ]
    rows = []
    for i, (name, kind, precision, sparse) in enumerate(variants):
        r = child(kind, model_dir, args.steps, precision, 2e-5, work / f"out{i}")
        tps = tokens_per_second(r["step_seconds"], args.skip)
        flops = model_flops_per_token(cfg, sparse) * tps
        rows.append({"variant": name, "tokens_per_s": tps, "peak_rss_gb": r["peak_rss_mb"] / 1024,
                     "tflops": flops / 1e12, "mfu_bf16": flops / peak_bf16})
        print(f"{name}: {tps:,.0f} tokens/s", file=sys.stderr)
    base, trainer_bf16 = rows[0]["tokens_per_s"], rows[1]["tokens_per_s"]
    for r in rows:
        r["vs_guide"] = r["tokens_per_s"] / base
        r["vs_trainer_bf16"] = r["tokens_per_s"] / trainer_bf16

    # parity: pretrained MiniLM (no MLM head: a new one), the guide (fp32) vs mlmtune with the same recipe (no
    # head warm-up: only the computation differs) and as shipped (its head warm-up), same steps, same start
    from mlmtune.model.load import builtin_model_dir

    mini = str(builtin_model_dir())
    parity = {}
    for name, kind, precision, extra in (("guide_fp32", "guide", "fp32", ()),
                                         ("mlmtune_same_recipe", "mlmtune", "auto", ("--head-warmup-steps", "0")),
                                         ("mlmtune", "mlmtune", "auto", ())):
        out = work / f"parity-{name}"
        child(kind, mini, args.parity_steps, precision, 1e-4, out, *extra)
        parity[name] = run_child(me, "--child", "score", "--model-dir", str(out), "--corpus", str(corpus))
    start = run_child(me, "--child", "score", "--model-dir", mini, "--corpus", str(corpus))
    diff = parity["mlmtune_same_recipe"]["eval_loss"] / parity["guide_fp32"]["eval_loss"] - 1
    diff_shipped = parity["mlmtune"]["eval_loss"] / parity["guide_fp32"]["eval_loss"] - 1

    print(table(rows, [("variant", "variant", ""), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("vs_guide", "x guide", ".2f"), ("vs_trainer_bf16", "x Trainer bf16", ".2f"),
                       ("peak_rss_gb", "peak RSS GB", ".2f"), ("tflops", "TFLOP/s", ".3f"),
                       ("mfu_bf16", "MFU (bf16 peak)", ".1%")]))
    print(f"\nmatmul peak measured in this run: bf16 {peak_bf16 / 1e12:.2f} TFLOP/s, fp32 {peak_fp32 / 1e12:.2f}")
    print(f"parity after {args.parity_steps} steps on MiniLM (fp32 eval, same fixed masks): eval loss "
          f"{start['eval_loss']:.4f} at start; guide {parity['guide_fp32']['eval_loss']:.4f}, mlmtune with the "
          f"guide's recipe {parity['mlmtune_same_recipe']['eval_loss']:.4f} ({diff:+.2%}), mlmtune as shipped (head "
          f"warm-up) {parity['mlmtune']['eval_loss']:.4f} ({diff_shipped:+.2%})")
    path = write_json("train_throughput", {
        "steps": args.steps, "batch": BATCH, "block": BLOCK, "model": "RoBERTa 6x768, vocab 50265 (random init)",
        "matmul_peak_tflops": {"bf16": peak_bf16 / 1e12, "fp32": peak_fp32 / 1e12}, "rows": rows,
        "parity": {"steps": args.parity_steps, "start_eval_loss": start["eval_loss"],
                   "guide_fp32_eval_loss": parity["guide_fp32"]["eval_loss"],
                   "mlmtune_same_recipe_eval_loss": parity["mlmtune_same_recipe"]["eval_loss"],
                   "relative_difference": diff, "mlmtune_as_shipped_eval_loss": parity["mlmtune"]["eval_loss"],
                   "as_shipped_relative_difference": diff_shipped}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
