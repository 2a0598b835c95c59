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
``int(a * src_len + b)`` decoding steps (:func:`nmt_ls.engines.max_output_len`, ``src_len`` with
eos), pad and bos masked before the softmax (``suppress_sequences``), no minimum length, and one
rule at the length limit (CTranslate2's own, which our search follows: the hypotheses kept at the
last step end there, cut after their token if it is not eos), so float32 gives our search's ids.

Calls: CTranslate2 takes one ``max_decoding_length`` per call and has no per-sentence limit, so
there is one call per distinct limit; all of them are made at once (``asynchronous=True``), and
CTranslate2's workers (``inter_threads``, :func:`thread_split`) take their token-budget batches
from one queue, as they would from one call. A sentence's output depends on its own limit alone,
never on the sentences decoded with it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from nmt_ls.config import EvalConfig
from nmt_ls.engines import encode_sources, import_ctranslate2, load_for_inference, max_output_len
from nmt_ls.hardware import usable_cores
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
    settings = {"checkpoint": str(checkpoint), "quantization": quantization, "model": cfg["model"], "eval": cfg["eval"]}
    return write_export(model, tok, out_dir, settings)


def write_export(model: Seq2Seq, tok: Tokenizer, out_dir: Path, settings: dict) -> Path:
    """Write the CTranslate2 model directory ``out_dir`` for ``model`` (a checkpoint's, or one in
    training) as ``settings`` say: ``quantization``, ``model`` (its config dict), ``eval`` and
    ``checkpoint`` (None for weights in memory), kept in its ``nmt_ls.json`` with the model's
    ``max_positions``. Built beside ``out_dir`` and renamed into place, replacing what is there."""
    spec = _spec(model, tok, settings["model"].get("pre_norm", True))
    spec.validate()
    spec.optimize(quantization=settings["quantization"])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        spec.save(str(tmp))
        (tmp / SPM).write_bytes(tok.sp.serialized_model_proto())
        settings = {**settings, "max_positions": model.max_positions}
        (tmp / SETTINGS).write_text(json.dumps(settings, indent=2), encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def thread_split(device: str, threads: int = 0, intra_threads: int = 1) -> tuple[int, int]:
    """(inter_threads, intra_threads) of a CTranslate2 translator for the work it does.

    On the CPU, ``threads`` cores in all (0: every core this process may use) run as
    ``threads // intra_threads`` workers of ``intra_threads`` threads each. CTranslate2 runs the
    batches of the calls in flight on its workers in parallel, so batched input keeps every core
    busy with one thread per batch (``inter_threads=cores, intra_threads=1``), and one sentence
    runs on one worker with one thread, measured far faster than two intra threads (issue 28):
    the default serves both. On a GPU (``"cuda"``, or ``"auto"`` where one is found): one worker.
    """
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: every core this process may use), got {threads}")
    if intra_threads < 1:
        raise ValueError(f"intra_threads must be >= 1, got {intra_threads}")
    on_gpu = device == "cuda" or (device == "auto" and import_ctranslate2().get_cuda_device_count() > 0)
    if on_gpu:
        return 1, intra_threads
    return max(1, (threads or usable_cores()) // intra_threads), intra_threads


def load_exported(
    path: str | Path, device: str = "cpu", compute_type: str = "default", threads: int = 0, intra_threads: int = 1
):
    """(CTranslate2 translator, tokenizer, settings dict with "eval" and "max_positions") from an
    export directory, as :func:`nmt_ls.engines.load_for_inference` gives them for a checkpoint.
    ``compute_type="default"`` keeps the exported precision; ``threads`` and ``intra_threads``:
    :func:`thread_split`."""
    ctranslate2 = import_ctranslate2()
    path = Path(path)
    if not (path / SETTINGS).is_file():
        raise FileNotFoundError(f"{path}: not an nmt-ls export (no {SETTINGS}; see nmt-ls export --help)")
    settings = json.loads((path / SETTINGS).read_text(encoding="utf-8"))
    inter, intra = thread_split(device, threads, intra_threads)
    translator = ctranslate2.Translator(
        str(path), device=device, compute_type=compute_type, inter_threads=inter, intra_threads=intra
    )
    return translator, Tokenizer(path / SPM), settings


def search_args(tok: Tokenizer, options: EvalConfig, with_scores: bool) -> dict:
    """``translate_batch``'s arguments for our search with ``options``, the length limit apart."""
    return dict(
        max_batch_size=options.max_tokens,
        batch_type="tokens",
        asynchronous=True,
        beam_size=options.beam_size,
        patience=1,
        num_hypotheses=1,
        length_penalty=options.len_penalty,
        suppress_sequences=[[tok.sp.id_to_piece(i)] for i in (tok.pad_id, tok.bos_id)],
        end_token=tok.sp.id_to_piece(tok.eos_id),
        return_end_token=True,  # the length penalty counts eos, as ours does
        max_input_length=0,  # sources are cut to the positions already
        min_decoding_length=0,
        return_scores=with_scores,
    )


def submit(
    translator, tok: Tokenizer, src_ids: list[list[int]], options: EvalConfig, max_positions: int, with_scores: bool
) -> list:
    """Start CTranslate2 on every source (ids without eos, non-empty, within the exported model's
    ``max_positions``) at once; returns (source index, pending result) pairs for :func:`collect`.
    Each source's length limit is its own (:func:`nmt_ls.engines.max_output_len`, the source
    counted with its eos) and ``max_decoding_length`` is one number a call: one asynchronous call
    per limit, the longest first, so that CTranslate2's workers share one queue of batches as in
    one call. ``with_scores=False`` spares greedy search its softmax (the scores are then None)."""
    limits = [max_output_len(len(ids) + 1, options, max_positions) for ids in src_ids]
    by_limit: dict[int, list[int]] = {}
    for i in sorted(range(len(src_ids)), key=lambda i: -limits[i]):
        by_limit.setdefault(limits[i], []).append(i)
    search = search_args(tok, options, with_scores)
    pending = []
    for limit, group in by_limit.items():
        pieces = [[tok.sp.id_to_piece(t) for t in src_ids[i]] for i in group]
        pending += zip(group, translator.translate_batch(pieces, max_decoding_length=limit, **search))
    return pending


def collect(pending: list, tok: Tokenizer, progress: bool = False) -> list[tuple[list[int], float | None]]:
    """(token ids without bos and eos, score) of each source of :func:`submit`, in source order."""
    out: list[tuple[list[int], float | None]] = [([], None)] * len(pending)
    for i, pending_result in tqdm(pending, desc="translate", disable=not progress, unit="sent"):
        result = pending_result.result()
        ids = [tok.sp.piece_to_id(p) for p in result.hypotheses[0]]
        out[i] = (ids[:-1] if ids and ids[-1] == tok.eos_id else ids, result.scores[0] if result.scores else None)
    return out


def decode_ids(
    translator, tok: Tokenizer, src_ids: list[list[int]], options: EvalConfig, max_positions: int
) -> list[tuple[list[int], float]]:
    """(token ids without bos and eos, score) for each source (ids without eos, non-empty, within
    the positions), as :func:`nmt_ls.decode.beam_search` gives them (greedy search for beam size 1,
    whose score is the length-normalised log-probability); ``max_positions`` is the exported model's."""
    return collect(submit(translator, tok, src_ids, options, max_positions, with_scores=True), tok)


def translate(
    translator, tok: Tokenizer, lines: list[str], options: EvalConfig, max_positions: int, progress: bool = False
) -> list[str]:
    """:func:`nmt_ls.inference.translate` on CTranslate2: the same options, outputs and warnings
    (over-long sources cut with a warning, empty lines kept empty); ``max_positions`` is the
    exported model's (``settings["max_positions"]`` from :func:`load_exported`). All the lines
    are in flight at once (:func:`submit`)."""
    src_ids = encode_sources(tok, lines, max_positions)
    todo = [i for i, ids in enumerate(src_ids) if ids]
    pending = submit(translator, tok, [src_ids[i] for i in todo], options, max_positions, with_scores=False)
    out = collect(pending, tok, progress)
    hyps = [""] * len(lines)
    for i, (ids, _) in zip(todo, out):
        hyps[i] = tok.decode(ids)
    return hyps
