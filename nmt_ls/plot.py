"""Training curves from ``train_log.jsonl`` as one PNG: loss, perplexity, BLEU, lr."""
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


def plot_log(log_path: str | Path, png_path: str | Path) -> Path:
    """Draw a 2x2 figure (train/valid loss, ppl on a log scale, valid BLEU, lr) to ``png_path``."""
    train, valid = read_log(log_path)
    if not train and not valid:
        raise ValueError(f"{log_path}: no records to plot")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_loss, ax_ppl), (ax_bleu, ax_lr) = axes
    x = lambda recs: [r["update"] for r in recs]
    ax_loss.plot(x(train), [r["loss"] for r in train], label="train loss (smoothed)", lw=1)
    ax_loss.plot(x(train), [r["nll_loss"] for r in train], label="train nll", lw=1)
    ax_loss.plot(x(valid), [r["loss"] for r in valid], "o-", label="valid loss (smoothed)")
    ax_loss.plot(x(valid), [r["nll_loss"] for r in valid], "s-", label="valid nll")
    ax_loss.set(title="loss per target token (nats)", xlabel="update")
    ax_ppl.plot(x(train), [r["ppl"] for r in train], label="train", lw=1)
    ax_ppl.plot(x(valid), [r["ppl"] for r in valid], "o-", label="valid")
    ax_ppl.set(title="perplexity = exp(nll per token)", xlabel="update", yscale="log")
    ax_bleu.plot(x(valid), [r["bleu"] for r in valid], "o-", color="C2")
    ax_bleu.set(title="valid BLEU (greedy, sacreBLEU)", xlabel="update")
    ax_lr.plot(x(train), [r["lr"] for r in train], color="C3")
    ax_lr.set(title="learning rate", xlabel="update")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_ppl.legend(fontsize=8)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
