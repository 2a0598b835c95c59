"""Training curves from ``train_log.jsonl`` as one PNG: loss, perplexity, KL, BLEU, accuracy, lr."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_log(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, valid records) of a JSONL log; a bad line is named by number."""
    train, valid = [], []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON: {e}") from None
        (valid if rec.get("kind") == "valid" else train).append(rec)
    return train, valid


def _series(ax, recs: list[dict], key: str, *fmt, **kw) -> None:
    """Plot ``key`` against the update for the records that have it (older logs may not)."""
    have = [r for r in recs if key in r]
    if have:
        ax.plot([r["update"] for r in have], [r[key] for r in have], *fmt, **kw)


def plot_log(log_path: str | Path, png_path: str | Path) -> Path:
    """Draw a 2x3 figure to ``png_path``: loss and nll, perplexity (log scale), KL form,
    valid BLEU, token accuracy, learning rate."""
    train, valid = read_log(log_path)
    if not train and not valid:
        raise ValueError(f"{log_path}: no records to plot")
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    (ax_loss, ax_ppl, ax_kl), (ax_bleu, ax_acc, ax_lr) = axes
    _series(ax_loss, train, "loss", label="train loss (smoothed)", lw=1)
    _series(ax_loss, train, "nll_loss", label="train nll", lw=1)
    _series(ax_loss, valid, "loss", "o-", label="valid loss (smoothed)")
    _series(ax_loss, valid, "nll_loss", "s-", label="valid nll")
    ax_loss.set(title="loss per target token (nats)", xlabel="update")
    _series(ax_ppl, train, "ppl", label="train", lw=1)
    _series(ax_ppl, valid, "ppl", "o-", label="valid")
    ax_ppl.set(title="perplexity = exp(nll per token)", xlabel="update", yscale="log")
    _series(ax_kl, train, "kl", label="train", lw=1)
    _series(ax_kl, valid, "kl", "o-", label="valid")
    ax_kl.set(title="KL(q || p) per target token (nats)", xlabel="update")
    _series(ax_bleu, valid, "bleu", "o-", color="C2")
    ax_bleu.set(title="valid BLEU (greedy, sacreBLEU)", xlabel="update")
    _series(ax_acc, train, "accuracy", label="train", lw=1)
    _series(ax_acc, valid, "accuracy", "o-", label="valid")
    ax_acc.set(title="token accuracy (%)", xlabel="update")
    _series(ax_lr, train, "lr", color="C3")
    ax_lr.set(title="learning rate", xlabel="update")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
