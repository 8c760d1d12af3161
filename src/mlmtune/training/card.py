"""What a finished run leaves beside the model: metrics.json, training_curves.png and the model card
(README.md, with the metadata that makes the Hub show a fill-mask widget)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # the object API: no pyplot, so a notebook's plotting backend is left alone

from mlmtune.config import TrainConfig
from mlmtune.data.corpora import WIKIPEDIA, WIKIPEDIA_LICENCE
from mlmtune.evaluation.downstream import METHOD_NAMES
from mlmtune.evaluation.downstream import summary_line as downstream_summary
from mlmtune.evaluation.embedding import LOWERED, MIN_WORDS, chance_mrr10, lowered
from mlmtune.evaluation.embedding import summary_lines as embedding_summary


def write_metrics(metrics: dict[str, Any], folder: Path) -> Path:
    path = folder / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def plot_curves(metrics: dict[str, Any], folder: Path) -> Path:
    """Training loss and eval perplexity over optimizer steps, one panel each."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_ppl = fig.subplots(1, 2)
    losses = metrics.get("train_loss", [])
    ax_loss.plot([p["step"] for p in losses], [p["loss"] for p in losses], color="tab:blue")
    ax_loss.set(title="Training loss (masked tokens)", xlabel="step", ylabel="loss")
    points = [(0, metrics["perplexity_before"])] if metrics.get("perplexity_before") is not None else []
    points += [(e["step"], e["perplexity"]) for e in metrics.get("epochs", [])]
    general = [(0, metrics.get("general_perplexity_before")), (metrics.get("train_steps", 0),
                                                                 metrics.get("general_perplexity_after"))]
    general = [p for p in general if p[1] is not None]
    if points:
        ax_ppl.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="tab:orange",
                    label="eval split")
        ax_ppl.set_yscale("log")
    if general:
        ax_ppl.plot([p[0] for p in general], [p[1] for p in general], marker="s", linestyle="--", color="tab:green",
                    label=f"general: {metrics.get('general_eval')}")
        ax_ppl.set_yscale("log")
    if points or general:
        ax_ppl.legend()
    else:
        ax_ppl.text(0.5, 0.5, "no eval split (--test-size 0)", ha="center", va="center", transform=ax_ppl.transAxes)
    ax_ppl.set(title="Eval perplexity (fixed masks)", xlabel="step", ylabel="perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = folder / "training_curves.png"
    fig.savefig(path, dpi=100)
    return path


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.2f}"


def _token_rows(metrics: dict[str, Any]) -> str:
    """A whole-word or span run's eval on token masks too, the yardstick that compares runs of any scheme."""
    if "token_eval_loss_after" not in metrics:
        return ""
    return (f"| before, on token masks | {_fmt(metrics.get('token_eval_loss_before'))} | "
            f"{_fmt(metrics.get('token_perplexity_before'))} |\n"
            f"| after, on token masks | {_fmt(metrics.get('token_eval_loss_after'))} | "
            f"{_fmt(metrics.get('token_perplexity_after'))} |\n")


def _eval_precision(metrics: dict[str, Any]) -> str:
    p = metrics.get("eval_precision") or "fp32"
    return "fp32" if p == "fp32" else f"{p} autocast (from fp32 weights)"


def summary_lines(m: dict[str, Any]) -> list[str]:
    """The run's last lines: how the eval split's perplexity moved, the general corpus', and the vocabulary's."""
    lines = []
    if m.get("perplexity_before") is not None and m.get("perplexity_after") is not None:
        lines.append(f"perplexity: {m['perplexity_before']:,.2f} before -> {m['perplexity_after']:,.2f} after "
                     f"(eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss_after']:.4f})")
    if m.get("general_perplexity_before") is not None and m.get("general_perplexity_after") is not None:
        b, a = m["general_perplexity_before"], m["general_perplexity_after"]
        lines.append(f"general perplexity ({m['general_eval']}, what the model forgot): {b:,.2f} before -> "
                     f"{a:,.2f} after ({a / b - 1:+.1%})")
    if m.get("cloze_top3_before") is not None and m.get("cloze_top3_after") is not None:
        lines.append(f"cloze ({m['cloze']}, {m['cloze_cases']} held-out cases): top-1 {m['cloze_top1_before']:.1%} -> "
                     f"{m['cloze_top1_after']:.1%}, top-3 {m['cloze_top3_before']:.1%} -> {m['cloze_top3_after']:.1%}")
    if (line := downstream_summary(m)) is not None:
        lines.append(line)
    lines += embedding_summary(m)
    if m.get("added_tokens"):
        tpw = (f"; tokens per word {m['tokens_per_word_before']:.3f} -> {m['tokens_per_word_after']:.3f}"
               if m.get("tokens_per_word_before") is not None else "")
        lines.append(f"added {m['added_tokens']} words to the tokenizer{tpw}")
    if m.get("nll_per_word_before") is not None:
        lines.append(f"tokenizer-free, on {m['tokenizer_free_texts']} held-out texts: {m['nll_per_word_before']:.3f} "
                     f"-> {m['nll_per_word_after']:.3f} nats per word, {m['bits_per_char_before']:.3f} -> "
                     f"{m['bits_per_char_after']:.3f} bits per character")
    return lines


def _general_section(m: dict[str, Any]) -> str:
    if "general_eval" not in m:
        return ""
    source = m["general_eval"]
    licence = f"\nText: {WIKIPEDIA_LICENCE}.\n" if source in WIKIPEDIA else ""
    return f"""
## What it forgot

The same model on a fixed sample of a general corpus, `{source}` ({m['general_blocks']} blocks,
{m['general_masked_tokens']:,} masked tokens, masks drawn once from seed 0): a rise means the
adaptation cost general knowledge.

| | loss | perplexity |
| --- | --- | --- |
| before | {_fmt(m.get("general_loss_before"))} | {_fmt(m.get("general_perplexity_before"))} |
| after | {_fmt(m.get("general_loss_after"))} | {_fmt(m.get("general_perplexity_after"))} |
{licence}"""


def _cloze_section(m: dict[str, Any]) -> str:
    if "cloze" not in m:
        return ""
    return f"""
## What it learned of the domain's words

A cloze on held-out text: {m['cloze_cases']} occurrences of {m['cloze_words']} words ({m['cloze']}) in the
eval split, each masked whole; a word counts when each of its pieces is among the model's top k.

| | top-1 | top-3 |
| --- | --- | --- |
| before | {_pct(m.get("cloze_top1_before"))} | {_pct(m.get("cloze_top3_before"))} |
| after | {_pct(m.get("cloze_top1_after"))} | {_pct(m.get("cloze_top3_after"))} |
"""


def _downstream_section(m: dict[str, Any]) -> str:
    if "downstream" not in m:
        return ""
    runs = len(m["downstream_seeds"])

    def cell(key: str, when: str) -> str:
        mean, std = m.get(f"downstream_{key}_{when}"), m.get(f"downstream_{key}_std_{when}")
        return "n/a" if mean is None else f"{mean:.1%}" + (f" ± {std:.1%}" if runs > 1 else "")

    spread = (f"the mean ± standard deviation of {runs} runs (seeds {', '.join(map(str, m['downstream_seeds']))})"
              if runs > 1 else "one run (deterministic)")
    return f"""
## Does it help the task

A {METHOD_NAMES[m['downstream_method']]} on `{m['downstream']}` ({m['downstream_classes']} classes,
{m['downstream_train_examples']:,} train and {m['downstream_test_examples']:,} test texts), from the encoder
before and after this training; {spread}.

| | accuracy | macro-F1 |
| --- | --- | --- |
| before | {cell("accuracy", "before")} | {cell("f1", "before")} |
| after | {cell("accuracy", "after")} | {cell("f1", "after")} |
"""


def _embedding_section(m: dict[str, Any]) -> str:
    if "embedding_texts" not in m:
        return ""
    n = m["embedding_texts"]
    fell = f"\n{LOWERED[0].upper()}{LOWERED[1:]}.\n" if lowered(m) else ""
    return f"""
## What it did to the sentence embeddings

{n} held-out texts of at least {MIN_WORDS} words, each cut in two; each first half ranks the {n} second halves by the
model's own sentence embedding ({m['embedding_pooling']}, {m['embedding_similarity']} similarity), as
`SentenceTransformer` computes it. MRR@10 by chance: {chance_mrr10(n):.3f}.

| | MRR@10 | recall@1 |
| --- | --- | --- |
| before | {_fmt3(m.get("embedding_mrr10_before"))} | {_pct(m.get("embedding_recall1_before"))} |
| after | {_fmt3(m.get("embedding_mrr10_after"))} | {_pct(m.get("embedding_recall1_after"))} |
{fell}"""


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _vocabulary_section(m: dict[str, Any]) -> str:
    if not m.get("added_tokens"):
        return ""
    rows = [f"| tokens per word (training split) | {_fmt3(m.get('tokens_per_word_before'))} | "
            f"{_fmt3(m.get('tokens_per_word_after'))} |"]
    if m.get("nll_per_word_before") is not None:
        rows += [f"| nats per word ({m['tokenizer_free_texts']} held-out texts) | {_fmt3(m['nll_per_word_before'])} "
                 f"| {_fmt3(m['nll_per_word_after'])} |",
                 f"| bits per character | {_fmt3(m['bits_per_char_before'])} | {_fmt3(m['bits_per_char_after'])} |"]
    return f"""
## Vocabulary

{m['added_tokens']} of the domain's words were added to the tokenizer (`added_tokens.txt`), each
embedding started from the mean of its pieces'. The perplexities above count the new tokens, so
compare with the base model by the tokenizer-free figures (whole-word pseudo-log-likelihood):

| | before | after |
| --- | --- | --- |
{chr(10).join(rows)}
"""


def _fmt3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _sentence_use(m: dict[str, Any], name: str) -> str:
    if not m.get("sentence_modules"):
        return ""
    return f"""
It keeps the sentence-transformers modules of the model it started from ({", ".join(m["sentence_modules"])}),
with this encoder:

```python
from sentence_transformers import SentenceTransformer

embeddings = SentenceTransformer("{name}").encode(["The answer is here."])
```
"""


def write_model_card(cfg: TrainConfig, metrics: dict[str, Any], folder: Path, mask_token: str,
                     name: str | None = None) -> Path:
    """A Hugging Face model card: YAML metadata (pipeline_tag: fill-mask) and the run's numbers."""
    base = cfg.model if not cfg.model.startswith(("/", ".", "~", "builtin:")) else None
    dataset = cfg.data.dataset or ""
    hub_dataset = dataset if "/" in dataset and not dataset.startswith(("/", ".", "~")) else None
    sentence = bool(metrics.get("sentence_modules"))  # a sentence encoder: sentence-transformers loads it too
    meta = ["library_name: transformers", "pipeline_tag: fill-mask", "tags:", "- fill-mask", "- mlmtune",
            *(["- sentence-transformers"] if sentence else [])]
    if base:
        meta.append(f"base_model: {base}")
    if hub_dataset:
        meta += ["datasets:", f"- {hub_dataset}"]
    rows = [
        ("base model", cfg.model), ("dataset", f"{dataset} (split `{cfg.data.split}`, field "
                                    f"`{cfg.data.text_field}`)"),
        ("eval split", f"{cfg.data.held_out:.0%} of records" if cfg.data.held_out else "none"),
        ("block size", cfg.data.block_size), ("mlm probability", cfg.mlm_probability), ("masking", cfg.masking),
        ("learning rate", cfg.optim.learning_rate), ("weight decay", cfg.optim.weight_decay),
        ("batch size", f"{cfg.schedule.batch_size} x {cfg.schedule.gradient_accumulation_steps} accumulation"),
        ("optimizer steps", metrics["train_steps"]), ("warmup steps", cfg.optim.warmup_steps), ("seed", cfg.seed),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    name = name or Path(folder).resolve().name
    text = f"""---
{chr(10).join(meta)}
---

# {name}

A masked language model fine-tuned from `{cfg.model}` with
[mlmtune](https://pypi.org/project/mlmtune/) on `{dataset}`.

## Perplexity

Perplexity = exp(mean loss over masked tokens) on the held-out split, with eval masks drawn once
from the seed, so both numbers score the same predictions, both in {_eval_precision(metrics)}.

| | eval loss | perplexity |
| --- | --- | --- |
| before | {_fmt(metrics.get("eval_loss_before"))} | {_fmt(metrics.get("perplexity_before"))} |
| after | {_fmt(metrics.get("eval_loss_after"))} | {_fmt(metrics.get("perplexity_after"))} |
{_token_rows(metrics)}
Masked eval tokens: {metrics.get("eval_masked_tokens", 0):,}.
{_cloze_section(metrics)}{_downstream_section(metrics)}{_embedding_section(metrics)}{_general_section(metrics)}\
{_vocabulary_section(metrics)}
## Training

| setting | value |
| --- | --- |
{table}

## Use

```python
from transformers import pipeline

fill = pipeline("fill-mask", model="{name}")
fill("The answer is {mask_token}.")
```

or `mlmtune fill --model {name} "The answer is {mask_token}."`
{_sentence_use(metrics, name)}"""
    path = folder / "README.md"
    path.write_text(text)
    return path
