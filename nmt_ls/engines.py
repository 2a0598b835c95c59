"""What both decoding engines share: the torch search (:mod:`nmt_ls.inference`) and CTranslate2
(:mod:`nmt_ls.ct2`) load a checkpoint alike, encode and cut sources alike, stop at the same length
and need the optional ``ctranslate2`` package the same way. Neither engine imports the other;
:mod:`nmt_ls.scoring` chooses between them.

model, tok, cfg = load_for_inference("runs/x/checkpoint_best.pt", device="cuda")
src_ids = encode_sources(tok, lines, model.max_positions)
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from nmt_ls import checkpoint
from nmt_ls.config import EvalConfig
from nmt_ls.model import build_model
from nmt_ls.tokenizer import Tokenizer

log = logging.getLogger(__name__)


class MissingExtra(RuntimeError):
    """An optional dependency that is not installed."""


def import_ctranslate2():
    """The ``ctranslate2`` module; :class:`MissingExtra` (a one-line install hint) without it."""
    try:
        import ctranslate2
    except ImportError:
        raise MissingExtra(
            'the ctranslate2 engine needs the "ct2" extra: pip install -e ".[ct2]" (or pip install "ctranslate2>=4")'
        ) from None
    return ctranslate2


def ctranslate2_available() -> bool:
    try:
        import_ctranslate2()
    except MissingExtra:
        return False
    return True


def load_for_inference(path: str | Path, device: torch.device | str = "cpu"):
    """(model on ``device`` in eval mode, tokenizer, config dict) from a checkpoint alone: the
    sentencepiece model it carries is unpacked to a temporary folder (never a stale spm.model
    lying beside it)."""
    return from_checkpoint(checkpoint.load(path), device)


def from_checkpoint(ckpt: dict, device: torch.device | str = "cpu"):
    """:func:`load_for_inference` of a checkpoint already read (``checkpoint.load``), for a caller
    that also wants its other keys (``update``) without reading the file twice."""
    with tempfile.TemporaryDirectory() as tmp:
        tok = Tokenizer(checkpoint.tensor_to_spm(ckpt["spm"], Path(tmp) / "spm.model"))
    model = build_model(tok.vocab_size, tok.pad_id, **ckpt["config"]["model"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), tok, ckpt["config"]


def encode_sources(tok: Tokenizer, lines: list[str], max_positions: int) -> list[list[int]]:
    """Source ids of ``lines`` without eos, each cut to ``max_positions - 1`` so that it fits the
    model's positions with its eos (one warning counts the cut lines); an empty list for a line
    with nothing to translate, whose hypothesis is the empty line."""
    max_src = max_positions - 1
    src_ids = [tok.encode(line) if line.strip() else [] for line in lines]
    too_long = sum(len(s) > max_src for s in src_ids)
    if too_long:
        log.warning("%d source line(s) longer than %d subwords were cut to fit the model", too_long, max_src)
    return [s[:max_src] for s in src_ids]


def max_output_len(src_len: int, options: EvalConfig, max_positions: int) -> int:
    """Decoding steps a hypothesis may take, eos included: ``int(max_len_a * src_len + max_len_b)``
    (fairseq's limit; ``src_len`` counts the source's eos, not its padding), at least 1 and at
    most ``max_positions - 1`` so that the decoder input (bos and the tokens) fits the positions.
    A hypothesis that has not ended by then is cut after this many tokens (both engines' rule:
    :mod:`nmt_ls.decode`)."""
    return min(max(int(options.max_len_a * src_len + options.max_len_b), 1), max_positions - 1)
