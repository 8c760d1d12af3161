"""Findings: what a check says about a run before any compute is spent on it.

`check_tokenizer` and `check_data` are the cheap checks every run makes at its start (`train`
prints their warnings); `mlmtune check` (`check.py`) adds the model, the engine and a timed probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mlmtune.data.blocks import BlockStats

OK, WARNING, ERROR = "ok", "warning", "error"


@dataclass
class Findings:
    """What a check found, in the order it was found, and the estimates of the run."""

    found: list[tuple[str, str]] = field(default_factory=list)
    estimates: dict[str, float | int | str] = field(default_factory=dict)

    def add(self, level: str, message: str) -> None:
        """Record one finding: OK, WARNING or ERROR, and what it is."""
        self.found.append((level, message))

    @property
    def warnings(self) -> list[str]:
        return [m for level, m in self.found if level == WARNING]

    @property
    def errors(self) -> list[str]:
        return [m for level, m in self.found if level == ERROR]

    def lines(self) -> list[str]:
        out = [f"{level:>7}  {message}" for level, message in self.found]
        if self.estimates:
            out.append("estimate " + ", ".join(f"{k}: {v}" for k, v in self.estimates.items()))
        return out


def check_tokenizer(tokenizer, findings: Findings) -> None:
    """Mask and pad tokens: a pad token that is the end-of-sequence token makes padding look like text."""
    if tokenizer.pad_token_id is None:
        findings.add(WARNING, "the tokenizer has no pad token: fill-mask will run one text per forward pass")
    elif tokenizer.eos_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        findings.add(WARNING, f"the pad token is the end-of-sequence token ({tokenizer.pad_token!r}), as the guide's "
                            "`tokenizer.pad_token = tokenizer.eos_token` makes it: padding is then indistinguishable "
                            "from a real end of text; prefer a tokenizer with its own pad token")
    else:
        findings.add(OK, f"tokenizer: mask {tokenizer.mask_token!r}, pad {tokenizer.pad_token!r}")


def check_data(stats: BlockStats, block_size: int, findings: Findings) -> None:
    """Empty texts, eval texts repeated in the training split, and what grouping made of each split."""
    if stats.empty_texts:
        findings.add(WARNING, f"{stats.empty_texts:,} of {stats.records:,} records have empty or whitespace-only text "
                            "(dropped)")
    if stats.duplicate_texts:
        findings.add(WARNING, f"{stats.duplicate_texts:,} eval texts also stand, word for word, in the training split: "
                            "perplexity will look better than it is; deduplicate the corpus")
    for split in stats.blocks:
        findings.add(OK, f"{split}: {stats.blocks[split]:,} blocks of {block_size} tokens, "
                       f"{stats.dropped_tokens[split]} tokens dropped by grouping")
