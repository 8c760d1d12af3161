"""A run's numbers while it trains, for the dashboards users already watch (`--report-to`).

`tensorboard` writes event files under OUTPUT_DIR/runs/ with the Trainer's tag names
(`train/loss`, `train/learning_rate`, `eval/loss`, ...), so `tensorboard --logdir OUTPUT_DIR/runs`
shows a run as it goes. A resumed run writes to the same folder and drops the points the
interrupted run logged after its checkpoint, so each curve stays one line.
"""

from __future__ import annotations

from pathlib import Path

from mlmtune.errors import MlmtuneError


def require(report_to: str) -> None:
    """Fail at the start of a run, not after its first evaluation, when the dashboard's package is missing."""
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise MlmtuneError("--report-to tensorboard needs the tensorboard package: "
                               "pip install 'mlmtune[tensorboard]'") from None


class Dashboard:
    """Writes scalars to TensorBoard, or nowhere (`report_to="none"`, or a rank other than 0)."""

    def __init__(self, report_to: str, output_dir: Path, start_step: int = 0, enabled: bool = True):
        self.writer = None
        if report_to != "tensorboard" or not enabled:
            return
        require(report_to)
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(output_dir) / "runs"
        # purge_step: TensorBoard hides what an interrupted run logged after the step it resumes from
        self.writer = SummaryWriter(log_dir=str(self.logdir), purge_step=start_step or None)

    def train(self, step: int, loss: float, learning_rate: float, tokens_per_second: float | None) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/learning_rate", learning_rate, step)
        if tokens_per_second is not None:
            self.writer.add_scalar("train/tokens_per_second", tokens_per_second, step)

    def eval(self, step: int, loss: float, perplexity: float) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("eval/loss", loss, step)
        self.writer.add_scalar("eval/perplexity", perplexity, step)
        self.writer.flush()  # an evaluation is rare and worth seeing at once

    def general(self, step: int, entry: dict) -> None:
        """The general corpus' check (`--general-eval`), before and after training."""
        if self.writer is None:
            return
        self.writer.add_scalar("eval_general/loss", entry["general_loss"], step)
        self.writer.add_scalar("eval_general/perplexity", entry["general_perplexity"], step)
        self.writer.flush()

    def cloze(self, step: int, entry: dict) -> None:
        """The domain cloze (`--cloze-words`), before and after training."""
        if self.writer is None:
            return
        self.writer.add_scalar("eval_cloze/top1", entry["cloze_top1"], step)
        self.writer.add_scalar("eval_cloze/top3", entry["cloze_top3"], step)
        self.writer.flush()

    def downstream(self, step: int, entry: dict) -> None:
        """The downstream probe (`--downstream`), before and after training: the mean over its runs."""
        if self.writer is None:
            return
        self.writer.add_scalar("eval_downstream/accuracy", entry["accuracy"], step)
        self.writer.add_scalar("eval_downstream/f1", entry["f1"], step)
        self.writer.flush()

    def embedding(self, step: int, entry: dict) -> None:
        """A sentence encoder's embedding check, before and after training."""
        if self.writer is None:
            return
        self.writer.add_scalar("eval_embedding/mrr10", entry["embedding_mrr10"], step)
        self.writer.add_scalar("eval_embedding/recall1", entry["embedding_recall1"], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
