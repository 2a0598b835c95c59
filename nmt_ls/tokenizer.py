"""SentencePiece training and the ``Tokenizer`` wrapper; sole owner of special ids.

The ids are fixed for every model this module trains::

    PAD_ID = 0   (the criterion's ignore index)
    UNK_ID = 1
    BOS_ID = 2   (prepended to the decoder input)
    EOS_ID = 3   (appended to the decoder output)

Models are trained with ``normalization_rule_name="identity"``,
``remove_extra_whitespaces=False`` and ``byte_fallback=True`` by default, so
``decode(encode(x)) == x`` for any string ``x`` without leading/trailing
whitespace, including characters never seen in training (they become UTF-8
byte pieces instead of ``<unk>``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("unigram", "bpe")
SPECIAL_PIECES = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}


def _as_files(data) -> list[str] | None:
    """File names if ``data`` names files, else None (it holds sentences)."""
    if isinstance(data, (str, os.PathLike)):
        return [os.fspath(data)]
    if (
        isinstance(data, Sequence)
        and data
        and all(isinstance(x, os.PathLike) or (isinstance(x, str) and os.path.isfile(x)) for x in data)
    ):
        return [os.fspath(x) for x in data]
    return None


@dataclass(frozen=True)
class SpmOptions:
    """How ``train_spm`` trains, beyond the vocabulary's size and model type.

    Attributes:
        character_coverage (float): Default: 1.0 (every character of the data).
        normalization_rule_name (str): Default: ``"identity"`` (exact round trip);
            ``"nmt_nfkc"`` is SentencePiece's own default.
        byte_fallback (bool): unknown characters -> UTF-8 byte pieces (256 ids).
        input_sentence_size (int): sample this many sentences (0: use all).
        seed (int): seeds SentencePiece's sampling.
        num_threads (int): 1 keeps training bit-for-bit reproducible.
    """

    character_coverage: float = 1.0
    normalization_rule_name: str = "identity"
    byte_fallback: bool = True
    input_sentence_size: int = 0
    seed: int = 0
    num_threads: int = 1


def train_spm(
    data: str | os.PathLike | Sequence[str | os.PathLike] | Iterable[str],
    model_prefix: str | os.PathLike,
    vocab_size: int,
    model_type: str = "unigram",
    options: SpmOptions = SpmOptions(),
    **extra,
) -> Path:
    """Train a SentencePiece model with the fixed special ids.

    For a joint model pass the files (or sentences) of both sides together.

    Args:
        data: a text file, a list of text files (``Path`` objects or names of
            existing files), or an iterable of sentences.
        model_prefix: writes ``{model_prefix}.model`` and ``.vocab``.
        vocab_size: number of pieces, specials and byte pieces included.
        model_type: ``"unigram"`` or ``"bpe"``.
        options: the other training options (see ``SpmOptions``).
        extra: further ``SentencePieceTrainer`` options.
    Returns:
        path of the ``.model`` file.
    Raises:
        ValueError: ``vocab_size`` is larger than the data allows.
    """
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    kwargs = _trainer_kwargs(prefix, vocab_size, model_type, options)
    kwargs.update(extra)
    spm.set_random_generator_seed(options.seed)
    try:
        spm.SentencePieceTrainer.train(**_trainer_input(data), **kwargs)
    except RuntimeError as err:
        msg = str(err)
        if "Vocabulary size too high" in msg or "Vocabulary size is smaller than required_chars" in msg:
            m = re.search(r"<= (\d+)", msg)
            hint = f"at most {m.group(1)}" if m else "a smaller value"
            raise ValueError(
                f"vocab_size={vocab_size} is too large for this training data; use {hint} "
                f"(sentencepiece: {msg.strip()})"
            ) from None
        raise
    model_path = prefix.with_name(prefix.name + ".model")
    log.info("trained %s sentencepiece model %s (vocab %d)", model_type, model_path, vocab_size)
    return model_path


def _trainer_input(data) -> dict:
    """``input`` (files, checked to exist) or ``sentence_iterator`` for the trainer."""
    files = _as_files(data)
    if files is None:
        return {"sentence_iterator": iter(data)}
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"no such file: {f}")
    return {"input": ",".join(files)}


def _trainer_kwargs(prefix: Path, vocab_size: int, model_type: str, options: SpmOptions) -> dict:
    """``SentencePieceTrainer.train`` options: the fixed special ids and pieces, no whitespace
    normalisation, and ``options``."""
    return dict(
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=options.character_coverage,
        normalization_rule_name=options.normalization_rule_name,
        remove_extra_whitespaces=False,
        byte_fallback=options.byte_fallback,
        input_sentence_size=options.input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=options.num_threads,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece=SPECIAL_PIECES[PAD_ID],
        unk_piece=SPECIAL_PIECES[UNK_ID],
        bos_piece=SPECIAL_PIECES[BOS_ID],
        eos_piece=SPECIAL_PIECES[EOS_ID],
        minloglevel=2,  # quiet: errors only
    )


class Tokenizer:
    """A trained SentencePiece model.

    Args:
        model_path: a ``.model`` file trained by ``train_spm`` (any model with
            pad=0, unk=1, bos=2, eos=3).
    Attributes:
        pad_id, unk_id, bos_id, eos_id, vocab_size (int)
    """

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"no such sentencepiece model: {self.model_path}")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        self.pad_id, self.unk_id = self.sp.pad_id(), self.sp.unk_id()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.vocab_size = self.sp.get_piece_size()
        got = (self.pad_id, self.unk_id, self.bos_id, self.eos_id)
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(
                f"{self.model_path}: special ids (pad, unk, bos, eos) are {got}, "
                f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}; retrain it with nmt_ls.tokenizer.train_spm"
            )

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size})"

    def encode(self, text: str) -> list[int]:
        """Piece ids of ``text``, without bos/eos."""
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), out_type=int)

    def decode(self, ids) -> str:
        """Text of ``ids`` (list or 1-D tensor): stops at the first eos, skips pad and bos."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.pad_id and i != self.bos_id:
                out.append(i)
        return self.sp.decode(out)

    def decode_batch(self, batch) -> list[str]:
        """``decode`` per row of a list of lists or a 2-D tensor (B, T)."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode(ids) for ids in batch]
