"""The commands a user types: translate, score, plot, average; and the fused/chunked training paths."""

import json
import math
import os
import sys
from pathlib import Path

import pytest
import sacrebleu
import torch

from nmt_ls import checkpoint, scoring
from nmt_ls.__main__ import main
from nmt_ls.config import load_recipe
from nmt_ls.train import train

from conftest import FIXTURE, SMOKE_RECIPE
from conftest import overrides as smoke_overrides

RECIPE = SMOKE_RECIPE


def overrides(out_dir, *extra):
    return smoke_overrides(out_dir, "model.dropout=0.0", *extra)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert (
        main(
            [
                "train",
                RECIPE,
                *overrides(out, "train.max_updates=8", "train.save_every_updates=4", "train.validate_every_updates=4"),
            ]
        )
        == 0
    )
    return out


def test_translate_file_and_stdin(run_dir, tmp_path, monkeypatch, capsys):
    src = tmp_path / "in.en"
    lines = (FIXTURE / "test.en").read_text().splitlines()[:7]
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.de"
    assert main(["translate", str(run_dir / "checkpoint_best.pt"), "-i", str(src), "-o", str(out), "--beam", "2"]) == 0
    hyps = out.read_text().splitlines()
    assert len(hyps) == 7
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines[:3]) + "\n"))
    assert main(["translate", str(run_dir / "checkpoint_best.pt"), "--beam", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == hyps[:3]  # batching does not change outputs


def test_score_matches_sacrebleu(tmp_path, capsys):
    hyp, ref, ref2 = tmp_path / "h", tmp_path / "r", tmp_path / "r2"
    hyp.write_text("the cat sat on the mat\nhello world\n")
    ref.write_text("the cat sat on a mat\nhello there world\n")
    ref2.write_text("a cat sat on the mat\nhello world\n")
    assert main(["score", str(hyp), "--ref", str(ref), str(ref2)]) == 0
    out = capsys.readouterr().out
    expected = sacrebleu.corpus_bleu(
        hyp.read_text().splitlines(), [ref.read_text().splitlines(), ref2.read_text().splitlines()]
    )
    assert f"BLEU {expected.score:.2f}  nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp|version:" in out
    assert "chrF2++ " in out and "TER " in out and "nrefs:2" in out


def test_plot_writes_a_png(run_dir, tmp_path):
    png = tmp_path / "curves.png"
    assert main(["plot", str(run_dir / "train_log.jsonl"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_average_checkpoints(run_dir, tmp_path):
    a, b = checkpoint.load(run_dir / "checkpoint_last.pt"), checkpoint.load(run_dir / "checkpoint_best.pt")
    out = tmp_path / "avg.pt"
    assert (
        main(["average", str(run_dir / "checkpoint_last.pt"), str(run_dir / "checkpoint_best.pt"), "--out", str(out)])
        == 0
    )
    avg = checkpoint.load(out)
    for k, v in avg["model"].items():
        torch.testing.assert_close(v, (a["model"][k].double() + b["model"][k].double()).div(2).float())
    assert "optimizer" not in avg and avg["averaged_from"][0].endswith("checkpoint_last.pt")


@pytest.mark.parametrize("path", ["fused", "chunked"])
def test_fused_and_chunked_paths_train_like_the_reference(tmp_path, path):
    """Same seed, no dropout: the fused criterion and the chunked output layer give the
    reference's losses and gradient norms, update for update. Weights agree to 1e-4: Adam
    divides by sqrt(v), so float rounding in a near-zero gradient moves a weight by up to
    lr (2e-3) per update whichever path computed it."""
    logs, weights = {}, {}
    for p in ("reference", path):
        cfg = load_recipe(
            RECIPE,
            overrides(
                tmp_path / p, "train.max_updates=5", "train.log_every_updates=1", f"criterion.implementation={p!r}"
            ),
        )
        summary = train(cfg)
        logs[p] = [json.loads(line) for line in Path(summary["log"]).read_text().splitlines() if '"train"' in line]
        weights[p] = checkpoint.load(summary["checkpoint_last"])["model"]
    for ra, rb in zip(logs["reference"], logs[path]):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["nll_loss"] == pytest.approx(
            rb["nll_loss"], rel=1e-5
        )
        assert ra["gnorm"] == pytest.approx(rb["gnorm"], rel=1e-4)
        assert math.isclose(rb["ppl"], math.exp(rb["nll_loss"]), rel_tol=1e-12)
    for k in weights["reference"]:
        torch.testing.assert_close(weights["reference"][k], weights[path][k], rtol=1e-3, atol=1e-4)


def test_translate_with_a_budget_below_one_sentence_decodes_each_alone(run_dir, tmp_path):
    """``--max-tokens 8``, less than any of these sentences: each is decoded alone, with the
    outputs of the recipe's budget (it was an error blaming "index 0" for line 2)."""
    src = tmp_path / "in.en"
    src.write_text("\n" + "\n".join((FIXTURE / "test.en").read_text().splitlines()[:5]) + "\n")
    ckpt = str(run_dir / "checkpoint_best.pt")
    for budget in ("8", "8000"):
        assert main(["translate", ckpt, "-i", str(src), "-o", str(tmp_path / budget), "--max-tokens", budget]) == 0
    hyps = (tmp_path / "8").read_text().splitlines()
    assert len(hyps) == 6 and hyps[0] == "" and hyps == (tmp_path / "8000").read_text().splitlines()


def test_training_with_eval_max_tokens_below_one_sentence_validates_and_saves(tmp_path):
    """eval.max_tokens=8: validation BLEU decodes each sentence alone; the run validates and
    writes its checkpoints (it died at its first validation, with none written), with the
    validation record of the default budget."""
    valid = {}
    for budget in (8, 8000):
        cfg = load_recipe(RECIPE, overrides(tmp_path / str(budget), "train.max_updates=2", f"eval.max_tokens={budget}"))
        summary = train(cfg)
        assert summary["updates"] == 2 and Path(summary["checkpoint_best"]).is_file()
        lines = Path(summary["log"]).read_text().splitlines()
        valid[budget] = [
            {k: v for k, v in json.loads(line).items() if k != "elapsed"} for line in lines if '"valid"' in line
        ]
    assert len(valid[8]) == 1 and valid[8] == valid[8000]


def one_line_error(capsys, command: str, path) -> None:
    assert capsys.readouterr().err == f"nmt-ls {command}: error: {path}: Is a directory\n"


def test_outputs_that_are_folders_are_one_line_errors_that_leave_nothing(run_dir, tmp_path, capsys):
    """translate -o, average --out and plot --out naming a folder: one line naming it, exit code
    2, and the folder as it was (no temporary file left in or beside it)."""
    folder = tmp_path / "out.png"  # with its suffix, so that matplotlib does not add one
    folder.mkdir()
    ckpt = str(run_dir / "checkpoint_best.pt")
    src = tmp_path / "in.en"
    src.write_text("Click OK.\n")
    capsys.readouterr()
    assert main(["translate", ckpt, "-i", str(src), "-o", str(folder)]) == 2
    one_line_error(capsys, "translate", folder)
    assert main(["average", ckpt, ckpt, "--out", str(folder)]) == 2
    one_line_error(capsys, "average", folder)
    assert main(["plot", str(run_dir / "train_log.jsonl"), "--out", str(folder)]) == 2  # caught at the CLI's edge
    one_line_error(capsys, "plot", folder)
    assert list(folder.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["in.en", "out.png"]


def test_an_out_dir_that_cannot_be_made_is_a_one_line_error(tmp_path, capsys):
    """out_dir under a file: one line naming the file, before any work."""
    (tmp_path / "a_file").write_text("")
    out_dir = tmp_path / "a_file" / "run"
    assert main(["train", RECIPE, *overrides(out_dir)]) == 2
    assert capsys.readouterr().err == f"nmt-ls train: error: {tmp_path / 'a_file'}: Not a directory\n"


def test_a_read_only_out_dir_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """A folder without write permission (mode 555): one line naming it, nothing written. Root
    may write there all the same, so as root os.access answers as for a user (by the mode bits)."""
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    out_dir.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(
            os, "access", lambda p, mode: real(p, mode) and (not mode & os.W_OK or bool(os.stat(p).st_mode & 0o222))
        )
    try:
        assert main(["train", RECIPE, *overrides(out_dir)]) == 2
    finally:
        out_dir.chmod(0o755)
    assert capsys.readouterr().err == f"nmt-ls train: error: {out_dir}: Permission denied\n"
    assert list(out_dir.iterdir()) == []


def run_smoke(out_dir, capsys, *extra) -> tuple[str, dict]:
    """`nmt-ls run` of the smoke recipe for 2 updates: (what it printed, summary.json's test scores)."""
    assert main(["run", RECIPE, *overrides(out_dir, "train.max_updates=2", "eval.beam_size=2"), *extra]) == 0
    return capsys.readouterr().out, json.loads((out_dir / "summary.json").read_text())["test"]


def test_run_decodes_the_test_split_with_the_engine_faster_in_the_probe_and_names_it(tmp_path, capsys, monkeypatch):
    """No time budget: the probe still times both engines (at the validation) and the faster
    at beam search decodes the test split; the summary line and summary.json name it with both
    speeds, the checkpoint holds the choice, and ``--resume`` keeps it without probing again."""
    pytest.importorskip("ctranslate2", reason='the ct2 extra is not installed (pip install -e ".[ct2]")')
    out = tmp_path / "run"
    printed, scores = run_smoke(out, capsys)
    probe_s = scores["probe_s"]
    engine, other = sorted(probe_s, key=lambda name: probe_s[name]["beam"])
    note = f"{probe_s[other]['beam'] / probe_s[engine]['beam']:.1f}x {other} in the probe"
    assert (scores["engine"], scores["precision"], scores["engine_note"]) == (engine, "float32", note)
    assert f"(decoded with {engine} float32, {note})\n" in printed
    ckpt = checkpoint.load(out / "checkpoint_last.pt")
    assert (ckpt["test_engine"], ckpt["probe_s"]) == (engine, probe_s)
    monkeypatch.setattr(scoring, "time_engines", lambda *args: pytest.fail("the resumed run probed again"))
    printed, resumed = run_smoke(out, capsys, "--resume")
    assert (resumed["engine"], resumed["probe_s"]) == (engine, probe_s)
    assert f"(decoded with {engine} float32, {note})\n" in printed


def test_run_without_ctranslate2_decodes_with_torch_and_says_why(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 raises ImportError
    printed, scores = run_smoke(tmp_path / "run", capsys)
    assert (scores["engine"], list(scores["probe_s"])) == ("torch", ["torch"])
    assert "(decoded with torch float32, ctranslate2 not installed)\n" in printed
