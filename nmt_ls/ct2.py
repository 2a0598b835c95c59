"""Deploy with CTranslate2: export a checkpoint to a CTranslate2 model directory, translate with it.

export("runs/x/checkpoint_best.pt", "runs/x/ct2", quantization="int8")
translator, tok, cfg = load_exported("runs/x/ct2")
hyps = translate(translator, tok, ["Click OK."], beam_size=5)

The directory holds CTranslate2's model (``model.bin``, ``config.json``, ``shared_vocabulary.json``),
the sentencepiece model (``spm.model``) and ``nmt_ls.json`` (the checkpoint's model and eval settings),
so it alone is enough to translate. The model maps onto CTranslate2's stock ``TransformerSpec``:
our position table is written into its position encodings, embeddings are scaled by sqrt(d_model),
the decoder starts from ``<s>`` and the source ends with ``</s>`` (``add_source_eos``).

Decoding matches :mod:`nmt_ls.decode`: the same beam size, length penalty (fairseq style: the score
is divided by the length with eos counted, hence ``return_end_token=True``), at most
``int(a * src_len + b)`` tokens (``src_len`` with eos; CTranslate2 takes one maximum per call, so
sentences are grouped by it), pad and bos masked before the softmax (``suppress_sequences``),
no minimum length. One difference remains: where a hypothesis reaches the maximum length, our search
forces eos and CTranslate2 keeps the best token (the output is cut to the maximum, so greedy ids stay
equal; a beam can rank such hypotheses differently).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from itertools import groupby
from pathlib import Path

import torch
from tqdm import tqdm

from nmt_ls.inference import encode_sources, load_for_inference
from nmt_ls.model import Seq2Seq
from nmt_ls.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SETTINGS = "nmt_ls.json"
SPM = "spm.model"


class MissingExtra(RuntimeError):
    """An optional dependency that is not installed."""


def import_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise MissingExtra(
            'the ctranslate2 engine needs the "ct2" extra: pip install -e ".[ct2]" (or pip install "ctranslate2>=4")'
        ) from None
    return ctranslate2


def available() -> bool:
    try:
        import_ctranslate2()
    except MissingExtra:
        return False
    return True


def _spec(model: Seq2Seq, tok: Tokenizer, pre_norm: bool):
    """CTranslate2's ``TransformerSpec`` holding ``model``'s weights (numpy views, no copies)."""
    from ctranslate2.specs import transformer_spec

    def arr(t: torch.Tensor):
        return t.detach().float().cpu().numpy()

    def linear(spec, module):
        spec.weight = arr(module.weight)
        if module.bias is not None:
            spec.bias = arr(module.bias)

    def norm(spec, module):
        spec.gamma, spec.beta = arr(module.weight), arr(module.bias)

    def ffn(spec, layer):
        norm(spec.layer_norm, layer.norm_ffn)
        linear(spec.linear_0, layer.ffn[0])
        linear(spec.linear_1, layer.ffn[2])

    def inputs(spec):
        spec.scale_embeddings = model.embed_scale
        table = model.pos_table if model.pos_embed is None else model.pos_embed.weight
        spec.position_encodings.encodings = arr(table)

    spec = transformer_spec.TransformerSpec.from_config(
        (len(model.encoder), len(model.decoder)), model.encoder[0].self_attn.n_heads, pre_norm=pre_norm
    )
    enc, dec = spec.encoder, spec.decoder
    inputs(enc)
    enc.embeddings[0].weight = arr(model.embed.weight)
    for s, layer in zip(enc.layer, model.encoder):
        linear(s.self_attention.linear[0], layer.self_attn.qkv)  # q, k, v stacked as CTranslate2 fuses them
        linear(s.self_attention.linear[1], layer.self_attn.out)
        norm(s.self_attention.layer_norm, layer.norm_attn)
        ffn(s.ffn, layer)
    inputs(dec)
    dec.embeddings.weight = arr(model.embed.weight)
    dec.projection.weight = arr(model.output_weight)
    for s, layer in zip(dec.layer, model.decoder):
        linear(s.self_attention.linear[0], layer.self_attn.qkv)
        linear(s.self_attention.linear[1], layer.self_attn.out)
        norm(s.self_attention.layer_norm, layer.norm_self)
        linear(s.attention.linear[0], layer.cross_attn.q)
        linear(s.attention.linear[1], layer.cross_attn.kv)  # k, v stacked
        linear(s.attention.linear[2], layer.cross_attn.out)
        norm(s.attention.layer_norm, layer.norm_cross)
        ffn(s.ffn, layer)
    if pre_norm:
        norm(enc.layer_norm, model.enc_norm)
        norm(dec.layer_norm, model.dec_norm)

    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    c = spec.config
    c.unk_token, c.bos_token, c.eos_token = (pieces[i] for i in (tok.unk_id, tok.bos_id, tok.eos_id))
    c.decoder_start_token = pieces[tok.bos_id]
    c.add_source_bos, c.add_source_eos = False, True
    c.layer_norm_epsilon = model.enc_norm.eps if pre_norm else model.encoder[0].norm_attn.eps
    return spec


def export(checkpoint: str | Path, out_dir: str | Path, quantization: str = "float32", force: bool = False) -> Path:
    """Write the CTranslate2 model directory ``out_dir`` for ``checkpoint`` with weights in
    ``quantization`` (int8, int8_float32, int16, float16, bfloat16, float32, ...). The directory
    is built beside ``out_dir`` and renamed into place; an existing one is replaced only with ``force``."""
    import_ctranslate2()
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} already exists (use --force to replace it)")
    model, tok, cfg = load_for_inference(checkpoint)
    spec = _spec(model, tok, cfg["model"].get("pre_norm", True))
    spec.validate()
    spec.optimize(quantization=quantization)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        spec.save(str(tmp))
        (tmp / SPM).write_bytes(tok.sp.serialized_model_proto())
        settings = {
            "checkpoint": str(checkpoint),
            "quantization": quantization,
            "max_positions": model.max_positions,
            "model": cfg["model"],
            "eval": cfg["eval"],
        }
        (tmp / SETTINGS).write_text(json.dumps(settings, indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_exported(path: str | Path, device: str = "cpu", compute_type: str = "default", threads: int = 0):
    """(CTranslate2 translator, tokenizer, settings dict with "eval" and "max_positions") from an
    export directory, as :func:`nmt_ls.inference.load_for_inference` gives them for a checkpoint.
    ``compute_type="default"`` keeps the exported precision; ``threads=0`` lets CTranslate2 choose."""
    ctranslate2 = import_ctranslate2()
    path = Path(path)
    if not (path / SETTINGS).is_file():
        raise FileNotFoundError(f"{path}: not an nmt-ls export (no {SETTINGS}; see nmt-ls export --help)")
    settings = json.loads((path / SETTINGS).read_text(encoding="utf-8"))
    translator = ctranslate2.Translator(str(path), device=device, compute_type=compute_type, intra_threads=threads)
    return translator, Tokenizer(path / SPM), settings


def decode_ids(
    translator,
    tok: Tokenizer,
    src_ids: list[list[int]],
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    max_tokens: int = 8000,
    max_positions: int = 1024,
) -> list[tuple[list[int], float]]:
    """(token ids without bos and eos, score) for each source (ids without eos, non-empty, within
    the positions), as :func:`nmt_ls.decode.beam_search` gives them (greedy search for beam size 1,
    whose score is the length-normalised log-probability)."""
    pieces = [[tok.sp.id_to_piece(i) for i in ids] for ids in src_ids]
    special = [[tok.sp.id_to_piece(i)] for i in (tok.pad_id, tok.bos_id)]
    eos = tok.sp.id_to_piece(tok.eos_id)
    out: list[tuple[list[int], float]] = [([], 0.0)] * len(src_ids)

    def max_len(i: int) -> int:  # as decode._max_lens: the source length counts its eos
        return min(max(int(max_len_a * (len(src_ids[i]) + 1) + max_len_b), 0), max_positions - 1)

    order = sorted(range(len(src_ids)), key=max_len)
    for limit, group in groupby(order, key=max_len):
        group = list(group)
        results = translator.translate_batch(
            [pieces[i] for i in group],
            max_batch_size=max_tokens,
            batch_type="tokens",
            beam_size=beam_size,
            patience=1,
            num_hypotheses=1,
            length_penalty=len_penalty,
            suppress_sequences=special,
            end_token=eos,
            return_end_token=True,  # the length penalty counts eos, as ours does
            max_input_length=0,  # sources are cut to the positions already
            max_decoding_length=limit + 1,  # limit tokens, then eos
            min_decoding_length=0,
            return_scores=True,
        )
        for i, result in zip(group, results):
            hyp = result.hypotheses[0]
            if hyp and hyp[-1] == eos:
                hyp = hyp[:-1]
            out[i] = ([tok.sp.piece_to_id(p) for p in hyp[:limit]], result.scores[0])
    return out


def translate(
    translator,
    tok: Tokenizer,
    lines: list[str],
    beam_size: int = 5,
    len_penalty: float = 1.0,
    max_len_a: float = 1.2,
    max_len_b: int = 10,
    max_tokens: int = 8000,
    max_positions: int = 1024,
    progress: bool = False,
) -> list[str]:
    """:func:`nmt_ls.inference.translate` on CTranslate2: the same options, outputs and warnings
    (over-long sources cut with a warning, empty lines kept empty); ``max_positions`` is the
    exported model's (``settings["max_positions"]`` from :func:`load_exported`)."""
    src_ids = encode_sources(tok, lines, max_positions)
    todo = sorted((i for i, ids in enumerate(src_ids) if ids), key=lambda i: len(src_ids[i]))
    hyps = [""] * len(lines)
    step = max(1, len(todo) // 20) if progress else len(todo) or 1  # chunks (of similar lengths) show progress
    for start in tqdm(range(0, len(todo), step), desc="translate", disable=not progress, unit="chunk"):
        chunk = todo[start : start + step]
        out = decode_ids(
            translator,
            tok,
            [src_ids[i] for i in chunk],
            beam_size=beam_size,
            len_penalty=len_penalty,
            max_len_a=max_len_a,
            max_len_b=max_len_b,
            max_tokens=max_tokens,
            max_positions=max_positions,
        )
        for i, (ids, _) in zip(chunk, out):
            hyps[i] = tok.decode(ids)
    return hyps
