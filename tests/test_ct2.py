"""CTranslate2 export and decoding (nmt_ls.ct2): the exported model decodes as our torch search does.

The models are untrained with random weights, their eos logit raised so that hypotheses end at
varied lengths, before the length limit or cut at it (both engines' last-step rule, nmt_ls.decode).
Id equality needs a faithful export, not a good translator.
"""

import json
import logging
import sys
from dataclasses import replace
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from nmt_ls import checkpoint
from nmt_ls.__main__ import main
from nmt_ls.batching import collate
from nmt_ls.config import EvalConfig, to_dict
from nmt_ls.decode import SearchSpec, beam_search, greedy_search
from nmt_ls.engines import encode_sources, load_for_inference
from nmt_ls.inference import translate as torch_translate
from nmt_ls.model import build_model
from nmt_ls.scoring import probe_translators, score_test_split, scoring_engine
from nmt_ls.tokenizer import Tokenizer, train_spm

from conftest import FIXTURE

pytest.importorskip("ctranslate2", reason='the ct2 extra is not installed (pip install -e ".[ct2]")')
from nmt_ls import ct2  # noqa: E402

LINES = (FIXTURE / "test.en").read_text(encoding="utf-8").splitlines()[:80]
MODELS = {  # model options, and the factor on the eos row of the output projection
    "default": (dict(), 8.0),
    "post_norm_untied": (dict(pre_norm=False, tie_embeddings=False), 4.0),
    "learned_untied": (dict(positions="learned", tie_embeddings=False), 3.0),
}
EVAL = EvalConfig(beam_size=4, len_penalty=1.0, max_len_a=1.2, max_len_b=10)


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("spm") / "spm"
    return train_spm([FIXTURE / "train.en", FIXTURE / "train.de"], prefix, vocab_size=500)


def random_checkpoint(path, spm_path, seed=0, eos_factor=8.0, **model_kwargs):
    """An nmt_ls checkpoint of an untrained model whose eos logit is raised by ``eos_factor``."""
    tok = Tokenizer(spm_path)
    kwargs = dict(d_model=32, n_heads=4, ffn_dim=64, enc_layers=2, dec_layers=2, dropout=0.0, max_positions=256)
    kwargs.update(model_kwargs)
    torch.manual_seed(seed)
    model = build_model(tok.vocab_size, tok.pad_id, **kwargs)
    with torch.no_grad():
        model.output_weight[tok.eos_id] *= eos_factor
    config = {"model": kwargs, "eval": to_dict(EVAL)}
    state = {"format": checkpoint.FORMAT, "model": model.state_dict(), "config": config, "update": 0}
    checkpoint.atomic_save({**state, "spm": checkpoint.spm_to_tensor(spm_path)}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, spm_path):
    """A model whose hypotheses all end before the length limit, so whole outputs can be compared."""
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_best.pt"
    return random_checkpoint(path, spm_path, seed=1, eos_factor=5.0, positions="learned", tie_embeddings=False)


def torch_ids(model, tok, src_ids, options):
    """(ids, score) of each source by our torch search with ``options`` (score None for greedy)."""
    src = collate(
        [s + [tok.eos_id] for s in src_ids],
        [[] for _ in src_ids],
        range(len(src_ids)),
        tok.pad_id,
        tok.bos_id,
        tok.eos_id,
    )
    spec = SearchSpec(tok.bos_id, tok.eos_id, tok.pad_id)
    if options.beam_size == 1:
        return [(ids, None) for ids in greedy_search(model, src.src, spec, options)]
    return [nbest[0] for nbest in beam_search(model, src.src, spec, options)]


@pytest.mark.parametrize("variant", MODELS)
def test_float32_export_decodes_like_torch(tmp_path, spm_path, variant):
    model_kwargs, eos_factor = MODELS[variant]
    path = random_checkpoint(tmp_path / "ckpt.pt", spm_path, seed=1, eos_factor=eos_factor, **model_kwargs)
    ct2.export(path, tmp_path / "ct2", quantization="float32")
    model, tok, _ = load_for_inference(path)
    translator, _, settings = ct2.load_exported(tmp_path / "ct2", threads=1)
    src_ids = encode_sources(tok, LINES, model.max_positions)
    for beam_size in (1, 4):
        options = replace(EVAL, beam_size=beam_size)
        ours = torch_ids(model, tok, src_ids, options)
        theirs = ct2.decode_ids(translator, tok, src_ids, options, settings["max_positions"])
        assert [ids for ids, _ in theirs] == [ids for ids, _ in ours]
        assert len({len(ids) for ids, _ in ours}) >= 8  # many lengths
        if beam_size > 1:
            assert [score for _, score in theirs] == pytest.approx([score for _, score in ours], abs=1e-4)


def test_int8_export_loads_and_translates(tmp_path, ckpt):
    ct2.export(ckpt, tmp_path / "int8", quantization="int8")
    translator, tok, settings = ct2.load_exported(tmp_path / "int8", threads=1)
    assert settings["quantization"] == "int8" and settings["eval"]["beam_size"] == 4
    assert translator.compute_type == "int8_float32"
    model, _, _ = load_for_inference(ckpt)
    reference = torch_translate(model, tok, LINES, EVAL)
    hyps = ct2.translate(translator, tok, LINES, EVAL, settings["max_positions"])
    assert len(hyps) == len(LINES) and sum(bool(h) for h in reference) >= 20
    assert sum(h == r for h, r in zip(hyps, reference) if r) >= 10  # int8 rounds; most outputs survive it


def test_export_dir_alone_translates_like_the_checkpoint(tmp_path, ckpt, monkeypatch, capsys):
    """The CLI: export, then translate with either engine; the export carries spm and eval settings."""
    out = tmp_path / "ct2"
    assert main(["export", str(ckpt), "--ctranslate2", str(out)]) == 0
    assert {"model.bin", "spm.model", "nmt_ls.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "nmt_ls.json").read_text())["eval"]["beam_size"] == 4
    src = tmp_path / "in.en"
    src.write_text("\n".join(LINES[:10]) + "\n", encoding="utf-8")
    assert main(["translate", str(ckpt), "-i", str(src), "-o", str(tmp_path / "torch.de")]) == 0
    args = ["-i", str(src), "-o", str(tmp_path / "ct2.de"), "--threads", "2"]
    assert main(["translate", str(out), "--engine", "ctranslate2", *args]) == 0
    assert (tmp_path / "ct2.de").read_text() == (tmp_path / "torch.de").read_text()
    assert main(["translate", str(out), "--engine", "ctranslate2", *args, "--intra-threads", "0"]) == 2
    assert capsys.readouterr().err == "nmt-ls translate: error: intra_threads must be >= 1, got 0\n"
    assert main(["translate", str(ckpt), *args, "--intra-threads", "2"]) == 2
    refused = "--intra-threads is for the ctranslate2 engine (torch runs one batch on --threads)"
    assert capsys.readouterr().err == f"nmt-ls translate: error: {refused}\n"
    assert main(["export", str(ckpt), "--ctranslate2", str(out)]) == 2
    assert "already exists (use --force to replace it)" in capsys.readouterr().err


def test_long_sources_are_cut_with_a_warning_and_empty_lines_stay_empty(tmp_path, spm_path, caplog):
    path = random_checkpoint(tmp_path / "ckpt.pt", spm_path)  # a model that says something for "" alone
    ct2.export(path, tmp_path / "ct2")
    translator, tok, settings = ct2.load_exported(tmp_path / "ct2", threads=1)
    model, _, _ = load_for_inference(path)
    long_line = " ".join(LINES[:30])  # far more than the 255 subwords that fit
    assert len(tok.encode(long_line)) > 300
    lines = ["", LINES[2], "", long_line, "   ", LINES[3]]
    for engine in ("torch", "ctranslate2"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="nmt_ls"):
            if engine == "torch":
                hyps = torch_translate(model, tok, lines, EVAL)
            else:
                hyps = ct2.translate(translator, tok, lines, EVAL, settings["max_positions"])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == ["1 source line(s) longer than 255 subwords were cut to fit the model"]
        assert len(hyps) == 6 and hyps[0] == hyps[2] == hyps[4] == ""
        assert all(hyps[i] for i in (1, 3, 5))


def test_missing_extra_is_a_one_line_error(ckpt, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 raises ImportError
    assert main(["export", str(ckpt), "--ctranslate2", str(tmp_path / "ct2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith('nmt-ls export: error: the ctranslate2 engine needs the "ct2" extra: pip install -e ".[ct2]"')
    assert err.count("\n") == 1


def test_the_probes_engines_decode_the_model_in_training_alike(ckpt):
    """The decoding probe's CTranslate2 comes from an export of the weights in memory (a model in
    training, no checkpoint): its float32 outputs are torch's, greedy and with the beam."""
    model, tok, cfg = load_for_inference(ckpt)
    translators = probe_translators(model, tok, cfg["model"], "cpu")
    assert list(translators) == ["torch", "ctranslate2"]
    for options in (replace(EVAL, beam_size=1), EVAL):
        assert translators["ctranslate2"](LINES[:20], options) == translators["torch"](LINES[:20], options)


def test_test_split_is_scored_alike_by_either_engine_chosen(tmp_path, ckpt):
    """The engine the probe chose decodes the test split and is named with both engines' speeds;
    in float32 the choice changes the speed alone: the same hypotheses and scores."""
    refs = (FIXTURE / "test.de").read_text(encoding="utf-8").splitlines()[:20]
    args = (list(zip(LINES[:20], refs)), EVAL)
    probe_s = {"torch": {"greedy": 0.02, "beam": 0.05}, "ctranslate2": {"greedy": 0.01, "beam": 0.02}}
    ours = score_test_split(scoring_engine(ckpt, "ctranslate2", probe_s), *args, tmp_path / "ct2_run", "de")
    assert (ours["engine"], ours["precision"], ours["engine_note"]) == (
        "ctranslate2",
        "float32",
        "2.5x torch in the probe",
    )
    (tmp_path / "torch_run").mkdir()
    theirs = score_test_split(scoring_engine(ckpt, "torch", probe_s), *args, tmp_path / "torch_run", "de")
    assert (theirs["engine"], theirs["precision"], theirs["engine_note"]) == (
        "torch",
        "float32",
        "0.4x ctranslate2 in the probe",
    )
    assert json.loads((tmp_path / "ct2_run" / "test_scores.json").read_text())["probe_s"] == probe_s
    for name in ("greedy", "beam"):
        hyps = (tmp_path / "ct2_run" / f"test.{name}.de").read_text()
        assert hyps == (tmp_path / "torch_run" / f"test.{name}.de").read_text()
        assert ours[name]["bleu"] == theirs[name]["bleu"]


def test_ctranslate2_chosen_but_missing_falls_back_to_torch_and_says_so(ckpt, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # a resume on a machine without the extra
    engine = scoring_engine(ckpt, "ctranslate2", {})
    assert (engine.name, engine.precision) == ("torch", "float32")
    assert engine.note.startswith(
        'ctranslate2, chosen by the probe, failed: the ctranslate2 engine needs the "ct2" extra'
    )
    assert "decoding the test split with torch" in caplog.text


def test_scoring_the_test_split_leaves_the_users_export_alone(tmp_path, ckpt, spm_path):
    """`nmt-ls run` scores with a float32 export of its own, made in a temporary folder: the
    user's int8 export in out_dir/ct2 (the README's Deploy folder) stays as it was, and the run
    leaves no export behind."""
    out_dir = tmp_path / "run"
    user = ct2.export(random_checkpoint(tmp_path / "other.pt", spm_path, seed=3), out_dir / "ct2", "int8")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    refs = (FIXTURE / "test.de").read_text(encoding="utf-8").splitlines()[:5]
    scores = score_test_split(scoring_engine(ckpt, "ctranslate2", {}), list(zip(LINES[:5], refs)), EVAL, out_dir, "de")
    assert (scores["engine"], scores["precision"]) == ("ctranslate2", "float32")
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    assert json.loads((user / "nmt_ls.json").read_text())["quantization"] == "int8"
    assert sorted(p.name for p in out_dir.iterdir()) == ["ct2", "test.beam.de", "test.greedy.de", "test_scores.json"]


def test_export_force_replaces_an_export_and_nothing_else(tmp_path, ckpt, capsys):
    """--force replaces an earlier export; a file or a folder that is not an export is refused in
    one line naming it, and left as it was."""
    a_file, a_folder, export = tmp_path / "notes.txt", tmp_path / "run", tmp_path / "ct2"
    a_file.write_text("mine\n")
    a_folder.mkdir()
    (a_folder / "checkpoint_best.pt").write_bytes(b"weights")
    for path in (a_file, a_folder):
        assert main(["export", str(ckpt), "--ctranslate2", str(path), "--force"]) == 2
        refused = f"{path} exists and is not an nmt-ls export (no nmt_ls.json): not replacing it"
        assert capsys.readouterr().err == f"nmt-ls export: error: {refused}\n"
    assert a_file.read_text() == "mine\n" and [p.name for p in a_folder.iterdir()] == ["checkpoint_best.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "run"]  # no temporary folder left
    ct2.export(ckpt, export, "int8")
    assert main(["export", str(ckpt), "--ctranslate2", str(export), "--force"]) == 0
    assert json.loads((export / "nmt_ls.json").read_text())["quantization"] == "float32"


def test_a_sentence_over_the_token_budget_is_decoded_alone_by_both_engines(tmp_path, spm_path):
    """A budget smaller than one sentence (eval.max_tokens=8): each longer sentence is decoded in
    a batch of its own, by our search as by CTranslate2, with the outputs of a large budget."""
    ckpt = random_checkpoint(tmp_path / "ckpt.pt", spm_path, 1, 4.0, positions="learned", tie_embeddings=False)
    model, tok, _ = load_for_inference(ckpt)
    translator, _, settings = ct2.load_exported(ct2.export(ckpt, tmp_path / "ct2"), threads=1)
    lines = ["", *LINES[:40]]
    assert sum(len(tok.encode(line)) + 1 > 8 for line in lines) >= 30
    for beam_size in (1, 4):
        small, large = replace(EVAL, beam_size=beam_size, max_tokens=8), replace(EVAL, beam_size=beam_size)
        reference = torch_translate(model, tok, lines, large)
        assert sum(bool(h) for h in reference) >= 10  # and all end before the length limit
        assert torch_translate(model, tok, lines, small) == reference
        assert ct2.translate(translator, tok, lines, small, settings["max_positions"]) == reference


AT_LIMIT = replace(EVAL, max_len_a=0.5, max_len_b=3)  # limits of 3 to 26 tokens for these lines


@pytest.fixture(scope="module")
def limit_model(tmp_path_factory, spm_path):
    """(model, tokenizer, float32 translator, max_positions) of an untrained model, its eos raised
    a little, whose hypotheses mostly reach AT_LIMIT's length limit and sometimes end before it."""
    tmp = tmp_path_factory.mktemp("limit")
    path = random_checkpoint(tmp / "ckpt.pt", spm_path, seed=2, eos_factor=3.0)
    model, tok, _ = load_for_inference(path)
    translator, _, settings = ct2.load_exported(ct2.export(path, tmp / "ct2"), threads=1)
    return model, tok, translator, settings["max_positions"]


@pytest.mark.parametrize("beam_size", [1, 4])
def test_engines_agree_where_hypotheses_reach_the_length_limit(limit_model, beam_size):
    """One rule at the limit for both engines: float32 ids, scores and strings are identical on
    every sentence, those that reach the limit included."""
    model, tok, translator, max_positions = limit_model
    options = replace(AT_LIMIT, beam_size=beam_size)
    src_ids = encode_sources(tok, LINES, max_positions)
    ours = torch_ids(model, tok, src_ids, options)
    theirs = ct2.decode_ids(translator, tok, src_ids, options, max_positions)
    limits = [int(0.5 * (len(s) + 1) + 3) for s in src_ids]
    reached = [len(ids) == limit for (ids, _), limit in zip(ours, limits)]
    assert sum(reached) >= 55 and all(len(ids) <= limit for (ids, _), limit in zip(ours, limits))
    assert [ids for ids, _ in theirs] == [ids for ids, _ in ours]
    if beam_size > 1:
        assert sum(not r for r in reached) >= 10  # and some end before it
        assert [score for _, score in theirs] == pytest.approx([score for _, score in ours], abs=1e-4)
    hyps = torch_translate(model, tok, LINES, options)
    assert ct2.translate(translator, tok, LINES, options, max_positions) == hyps
    assert sum(bool(h) for h in hyps) == len(LINES)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_one_sentence_at_a_time_decodes_as_all_at_once(limit_model, beam_size):
    """Each engine's output for a sentence does not depend on the sentences decoded with it."""
    model, tok, translator, max_positions = limit_model
    options, lines = replace(AT_LIMIT, beam_size=beam_size), LINES[:30]
    engines_ = {
        "torch": partial(torch_translate, model, tok, options=options),
        "ctranslate2": partial(ct2.translate, translator, tok, options=options, max_positions=max_positions),
    }
    for translate in engines_.values():
        all_at_once = translate(lines)
        assert len(set(all_at_once)) >= 15
        assert [translate([line])[0] for line in lines] == all_at_once


def test_thread_split_gives_every_core_a_worker_of_one_thread(monkeypatch):
    monkeypatch.setattr(ct2, "usable_cores", lambda: 4)
    assert ct2.thread_split("cpu") == (4, 1)
    assert ct2.thread_split("cpu", threads=2) == (2, 1)
    assert ct2.thread_split("cpu", threads=0, intra_threads=2) == (2, 2)  # the user's split
    assert ct2.thread_split("cpu", threads=3, intra_threads=4) == (1, 4)
    assert ct2.thread_split("cuda", threads=8) == (1, 1)
    with pytest.raises(ValueError, match=r"^threads must be >= 0 \(0: every core this process may use\), got -1$"):
        ct2.thread_split("cpu", threads=-1)
    with pytest.raises(ValueError, match=r"^intra_threads must be >= 1, got 0$"):
        ct2.thread_split("cpu", intra_threads=0)


class FakeTranslator:
    """Records translate_batch's calls; every hypothesis is the source itself, scored -1."""

    def __init__(self):
        self.calls = []

    def translate_batch(self, pieces, max_decoding_length, asynchronous, **search):
        self.calls.append((len(pieces), max_decoding_length, asynchronous))
        return [SimpleNamespace(result=lambda p=p: SimpleNamespace(hypotheses=[p], scores=[-1.0])) for p in pieces]


def test_all_sources_are_in_flight_at_once_one_call_per_length_limit(ckpt, monkeypatch):
    _, tok, _ = load_for_inference(ckpt)
    monkeypatch.setattr(ct2, "tqdm", lambda pending, **kwargs: pending)
    fake = FakeTranslator()
    src_ids = [[5] * n for n in (3, 9, 3, 4, 9, 9)]  # limits int(0.5 * (n + 1) + 3): 5, 8, 5, 5, 8, 8
    out = ct2.decode_ids(fake, tok, src_ids, replace(AT_LIMIT, beam_size=2), 256)
    assert fake.calls == [(3, 8, True), (3, 5, True)]  # the longest first, none waited for before the next
    assert out == [(ids, -1.0) for ids in src_ids]
