"""Deploy with CTranslate2: export a checkpoint to a CTranslate2 model directory, translate with it.

export("runs/x/checkpoint_best.pt", "runs/x/ct2", quantization="int8")
translator, tok, settings = load_exported("runs/x/ct2")
hyps = translate(translator, tok, ["Click OK."], from_dict(EvalConfig, settings["eval"]), settings["max_positions"])

The directory holds CTranslate2's model (``model.bin``, ``config.json``, ``shared_vocabulary.json``),
the sentencepiece model (``spm.model``) and ``nmt_ls.json`` (the checkpoint's model and eval settings),
so it alone is enough to translate. The model maps onto CTranslate2's stock ``TransformerSpec``:
our position table is written into its position encodings, embeddings are scaled by sqrt(d_model),
the decoder starts from ``<s>`` and the source ends with ``</s>`` (``add_source_eos``).

Decoding matches :mod:`nmt_ls.decode`: the same beam size, length penalty (fairseq style: the score
is divided by the length with eos counted, hence ``return_end_token=True``), at most
``int(a * src_len + b)`` tokens (:func:`nmt_ls.engines.max_output_len`, ``src_len`` with eos;
CTranslate2 takes one maximum per call, so sentences are grouped by it), pad and bos masked before
the softmax (``suppress_sequences``), no minimum length. One difference remains: where a hypothesis
reaches the maximum length, our search forces eos and CTranslate2 keeps the best token (the output
is cut to the maximum, so greedy ids stay equal; a beam can rank such hypotheses differently).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from itertools import groupby
from pathlib import Path

import torch
from tqdm import tqdm

from nmt_ls.config import EvalConfig
from nmt_ls.engines import encode_sources, import_ctranslate2, load_for_inference, max_output_len
from nmt_ls.model import Seq2Seq
from nmt_ls.tokenizer import Tokenizer

SETTINGS = "nmt_ls.json"
SPM = "spm.model"


def _arr(t: torch.Tensor):
    return t.detach().float().cpu().numpy()


def _linear(spec, module) -> None:
    spec.weight = _arr(module.weight)
    if module.bias is not None:
        spec.bias = _arr(module.bias)


def _norm(spec, module) -> None:
    spec.gamma, spec.beta = _arr(module.weight), _arr(module.bias)


def _self_attention(spec, attn, norm) -> None:
    _linear(spec.linear[0], attn.qkv)  # q, k, v stacked as CTranslate2 fuses them
    _linear(spec.linear[1], attn.out)
    _norm(spec.layer_norm, norm)


def _ffn(spec, layer) -> None:
    _norm(spec.layer_norm, layer.norm_ffn)
    _linear(spec.linear_0, layer.ffn[0])
    _linear(spec.linear_1, layer.ffn[2])


def _positions(spec, model: Seq2Seq) -> None:
    spec.scale_embeddings = model.embed_scale
    table = model.pos_table if model.pos_embed is None else model.pos_embed.weight
    spec.position_encodings.encodings = _arr(table)


def _set_weights(spec, model: Seq2Seq, pre_norm: bool) -> None:
    """Point the encoder and decoder of CTranslate2's ``TransformerSpec`` at ``model``'s weights."""
    enc, dec = spec.encoder, spec.decoder
    _positions(enc, model)
    enc.embeddings[0].weight = _arr(model.embed.weight)
    for s, layer in zip(enc.layer, model.encoder):
        _self_attention(s.self_attention, layer.self_attn, layer.norm_attn)
        _ffn(s.ffn, layer)
    _positions(dec, model)
    dec.embeddings.weight = _arr(model.embed.weight)
    dec.projection.weight = _arr(model.output_weight)
    for s, layer in zip(dec.layer, model.decoder):
        _self_attention(s.self_attention, layer.self_attn, layer.norm_self)
        _linear(s.attention.linear[0], layer.cross_attn.q)
        _linear(s.attention.linear[1], layer.cross_attn.kv)  # k, v stacked
        _linear(s.attention.linear[2], layer.cross_attn.out)
        _norm(s.attention.layer_norm, layer.norm_cross)
        _ffn(s.ffn, layer)
    if pre_norm:
        _norm(enc.layer_norm, model.enc_norm)
        _norm(dec.layer_norm, model.dec_norm)


def _spec(model: Seq2Seq, tok: Tokenizer, pre_norm: bool):
    """CTranslate2's ``TransformerSpec`` holding ``model``'s weights (numpy views, no copies)
    and ``tok``'s vocabulary and special tokens."""
    from ctranslate2.specs import transformer_spec

    spec = transformer_spec.TransformerSpec.from_config(
        (len(model.encoder), len(model.decoder)), model.encoder[0].self_attn.n_heads, pre_norm=pre_norm
    )
    _set_weights(spec, model, pre_norm)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    c = spec.config
    c.unk_token, c.bos_token, c.eos_token = (pieces[i] for i in (tok.unk_id, tok.bos_id, tok.eos_id))
    c.decoder_start_token = pieces[tok.bos_id]
    c.add_source_bos, c.add_source_eos = False, True
    c.layer_norm_epsilon = model.enc_norm.eps if pre_norm else model.encoder[0].norm_attn.eps
    return spec


def _replaceable(path: Path) -> bool:
    """Whether ``path`` is what an export may replace: an export, or an empty folder."""
    return (path / SETTINGS).is_file() or (path.is_dir() and not any(path.iterdir()))


def export(checkpoint: str | Path, out_dir: str | Path, quantization: str = "float32", force: bool = False) -> Path:
    """Write the CTranslate2 model directory ``out_dir`` for ``checkpoint`` with weights in
    ``quantization`` (int8, int8_float32, int16, float16, bfloat16, float32, ...). The directory
    is built beside ``out_dir`` and renamed into place; an existing one is replaced only with
    ``force``, and only if it is an export or an empty folder (never a file or another folder)."""
    import_ctranslate2()
    out_dir = Path(out_dir)
    if out_dir.exists() and not _replaceable(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not an nmt-ls export (no {SETTINGS}): not replacing it")
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
    export directory, as :func:`nmt_ls.engines.load_for_inference` gives them for a checkpoint.
    ``compute_type="default"`` keeps the exported precision; ``threads=0`` lets CTranslate2 choose."""
    ctranslate2 = import_ctranslate2()
    path = Path(path)
    if not (path / SETTINGS).is_file():
        raise FileNotFoundError(f"{path}: not an nmt-ls export (no {SETTINGS}; see nmt-ls export --help)")
    settings = json.loads((path / SETTINGS).read_text(encoding="utf-8"))
    translator = ctranslate2.Translator(str(path), device=device, compute_type=compute_type, intra_threads=threads)
    return translator, Tokenizer(path / SPM), settings


def decode_ids(
    translator, tok: Tokenizer, src_ids: list[list[int]], options: EvalConfig, max_positions: int
) -> list[tuple[list[int], float]]:
    """(token ids without bos and eos, score) for each source (ids without eos, non-empty, within
    the positions), as :func:`nmt_ls.decode.beam_search` gives them (greedy search for beam size 1,
    whose score is the length-normalised log-probability); ``max_positions`` is the exported model's."""
    pieces = [[tok.sp.id_to_piece(i) for i in ids] for ids in src_ids]
    special = [[tok.sp.id_to_piece(i)] for i in (tok.pad_id, tok.bos_id)]
    eos = tok.sp.id_to_piece(tok.eos_id)
    out: list[tuple[list[int], float]] = [([], 0.0)] * len(src_ids)

    def max_len(i: int) -> int:  # the source length counts its eos, as in the torch search
        return max_output_len(len(src_ids[i]) + 1, options, max_positions)

    order = sorted(range(len(src_ids)), key=max_len)
    for limit, group in groupby(order, key=max_len):
        group = list(group)
        results = translator.translate_batch(
            [pieces[i] for i in group],
            max_batch_size=options.max_tokens,
            batch_type="tokens",
            beam_size=options.beam_size,
            patience=1,
            num_hypotheses=1,
            length_penalty=options.len_penalty,
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
    translator, tok: Tokenizer, lines: list[str], options: EvalConfig, max_positions: int, progress: bool = False
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
        out = decode_ids(translator, tok, [src_ids[i] for i in chunk], options, max_positions)
        for i, (ids, _) in zip(chunk, out):
            hyps[i] = tok.decode(ids)
    return hyps
