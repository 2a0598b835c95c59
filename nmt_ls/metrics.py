"""Log records from logging outputs, and the one writer of every log line.

The criterion returns one logging output per batch (every value a sum); the loop sums them over
an update's batches and its workers (one collective), and :func:`train_record` and
:func:`valid_record` reduce a list of them with the criterion's ``reduce_metrics``, so that
training and validation count tokens, ppl and accuracy the same way. :class:`MetricsWriter`
turns a record into a line of ``train_log.jsonl``, TensorBoard scalars (every numeric key) and a
console line; :func:`postfix` gives the progress bar's.
"""

from __future__ import annotations

import json
import logging
import numbers
from pathlib import Path

from nmt_ls.criterions import reduce_metrics

log = logging.getLogger(__name__)

# What a record carries of reduce_metrics: losses per sample_size unit and per token, ppl, accuracy
LOSS_KEYS = ("loss", "nll_loss", "kl", "ppl", "accuracy")


def loss_metrics(logging_outputs: list[dict]) -> tuple[dict, dict]:
    """(the record's loss keys, all of reduce_metrics) for summed logging outputs."""
    m = reduce_metrics(logging_outputs)
    return {k: m[k] for k in LOSS_KEYS if k in m}, m


def train_record(update: int, epoch: float, outputs: list[dict], seconds: float, elapsed: float) -> dict:
    """The train line after ``update``: ``outputs`` are the updates' logging outputs since the
    last line (each summed over its batches and workers, with its ``lr`` and ``gnorm``)."""
    losses, m = loss_metrics(outputs)
    n = len(outputs)
    return {
        "kind": "train",
        "update": update,
        "epoch": epoch,
        **losses,
        "lr": outputs[-1]["lr"],
        "gnorm": sum(o["gnorm"] for o in outputs) / n,
        "wps": m["ntokens"] / max(seconds, 1e-9),
        "wpb": m["ntokens"] / n,
        "bsz": m["nsentences"] / n,
        "elapsed": elapsed,
    }


def valid_record(update: int, epoch: int, outputs: list[dict], bleu: tuple[float, str, int], elapsed: float) -> dict:
    """The valid line: the valid batches' logging outputs, and ``bleu`` as (score, signature,
    sentences) of greedy decoding."""
    score, signature, sentences = bleu
    losses, _ = loss_metrics(outputs)
    return {
        "kind": "valid",
        "update": update,
        "epoch": epoch,
        **losses,
        "bleu": score,
        "bleu_signature": signature,
        "bleu_sentences": sentences,
        "elapsed": elapsed,
    }


def console_line(record: dict) -> str:
    """``train | update 50 | epoch 0.25 | loss 5.132 | ...``: every field of the record."""
    fields = [record["kind"]]
    for key, value in record.items():
        if key == "kind":
            continue
        if isinstance(value, float):
            value = f"{value:.3e}" if key == "lr" else f"{value:.4g}" if abs(value) >= 1e4 else f"{value:.3f}"
        fields.append(f"{key} {value}")
    return " | ".join(fields)


def postfix(record: dict) -> dict:
    """The progress bar's loss, ppl and lr."""
    return {"loss": f"{record['loss']:.3f}", "ppl": f"{record['ppl']:.2f}", "lr": f"{record['lr']:.1e}"}


class MetricsWriter:
    """Writes records to ``train_log.jsonl``, TensorBoard (when installed) and the console."""

    def __init__(self, log_path: Path, tensorboard_dir: Path | None = None):
        self.log_path = log_path
        self.tensorboard = _summary_writer(tensorboard_dir) if tensorboard_dir else None

    def write(self, record: dict) -> None:
        with self.log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tensorboard:
            for key, value in record.items():
                if key != "update" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["update"])
        log.info("%s", console_line(record))

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def _summary_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(path))
