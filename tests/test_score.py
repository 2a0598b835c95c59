"""`nmt-ls score` against the `sacrebleu` command line, and line splitting for translate/score."""

import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from nmt_ls.__main__ import main
from nmt_ls.evaluate import read_lines, score_files, split_lines, write_lines

REF = Path(__file__).parent / "data" / "lohelp_en_de" / "test.de"  # 200 lines


def perturbed(refs: list[str], seed: int, p_drop: float, p_swap: float) -> list[str]:
    """Each line with up to three word drops and adjacent swaps: a system of BLEU ~60-65."""
    rng = random.Random(seed)
    out = []
    for line in refs:
        words = line.split()
        for _ in range(3):
            if len(words) > 1 and rng.random() < p_drop:
                del words[rng.randrange(len(words))]
            if len(words) > 2 and rng.random() < p_swap:
                i = rng.randrange(len(words) - 1)
                words[i], words[i + 1] = words[i + 1], words[i]
        out.append(" ".join(words))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(ref, base, sys2): two close systems, so that the p-values are neither 0 nor 1."""
    d = tmp_path_factory.mktemp("score")
    refs = read_lines(REF)
    paths = d / "ref.de", d / "base.de", d / "sys2.de"
    for path, lines in zip(paths, (refs, perturbed(refs, 1, 0.5, 0.5), perturbed(refs, 2, 0.45, 0.5)), strict=True):
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return tuple(map(str, paths))


CLI = """import json, sys
import sacrebleu.utils
from sacrebleu.sacrebleu import main
dumps = json.dumps  # sacreBLEU 2.6 cannot write its paired JSON (numpy float32 means): write them as floats
sacrebleu.utils.json.dumps = lambda obj, **kw: dumps(obj, default=float, **kw)
sys.argv = ["sacrebleu", *sys.argv[1:]]
main()
"""


def sacrebleu_cli(argv: list[str]):
    """The JSON that `sacrebleu ARGV --format json -w 10` prints, with the default seed."""
    env = {k: v for k, v in os.environ.items() if k != "SACREBLEU_SEED"}
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *argv, "--format", "json", "-w", "10"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout)


def nmt_ls_score(argv: list[str], monkeypatch, capsys) -> dict:
    capsys.readouterr()
    monkeypatch.delenv("SACREBLEU_SEED", raising=False)
    assert main(["score", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


METRICS = ["-m", "bleu", "chrf", "ter", "--chrf-word-order", "2"]


@pytest.mark.parametrize("test,n", [("bs", 100), ("ar", 200)])
def test_paired_test_equals_sacrebleu_cli(files, test, n, monkeypatch, capsys):
    ref, base, sys2 = files
    flags = [f"--paired-{test}", f"--paired-{test}-n", str(n)]
    ours = nmt_ls_score([base, sys2, "--ref", ref, *flags], monkeypatch, capsys)
    cli = sacrebleu_cli([ref, "-i", base, sys2, *METRICS, *flags])
    assert [row["system"] for row in cli] == [f"Baseline: {base}", sys2]
    assert [row["file"] for row in ours["systems"]] == [base, sys2]
    for row, cli_row in zip(ours["systems"], cli, strict=True):
        for name in ("BLEU", "chrF2++", "TER"):
            assert row[name] == cli_row[name]  # score, mean, ci, p_value: every digit
    p = [ours["systems"][1][name]["p_value"] for name in ("BLEU", "chrF2++", "TER")]
    assert all(0.05 < x < 0.95 for x in p), p  # the systems are close: the test has something to say
    if test == "bs":
        assert all(row[m]["ci"] > 0 for row in ours["systems"] for m in ("BLEU", "TER"))
    assert ours["signatures"]["BLEU"].startswith(f"nrefs:1|{test}:{n}|seed:12345|case:mixed|eff:no|tok:13a|")


def test_single_file_equals_sacrebleu_cli(files, monkeypatch, capsys):
    ref, base, _ = files
    ours = nmt_ls_score([base, "--ref", ref], monkeypatch, capsys)
    cli = sacrebleu_cli([ref, "-i", base, *METRICS])
    assert [c["name"] for c in cli] == list(ours["signatures"]) == ["BLEU", "chrF2++", "TER"]
    assert score_files(base, [ref]) == ours  # one path works as a list of one
    for c in cli:
        assert ours["signatures"][c["name"]] == c["signature"]
        assert round(ours["systems"][0][c["name"]]["score"], 10) == pytest.approx(c["score"], abs=1e-12)


def test_text_report_of_two_systems(files, capsys):
    ref, base, sys2 = files
    result = score_files([base, sys2], [ref], "bs", 100)
    assert main(["score", base, sys2, "--ref", ref, "--paired-bs", "--paired-bs-n", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    bleu_base, bleu_sys2 = (row["BLEU"] for row in result["systems"])
    assert lines[0].split() == ["system", "BLEU", "chrF2++", "TER"]
    assert lines[1].startswith(
        f"Baseline: {base}  {bleu_base['score']:.2f} ({bleu_base['mean']:.2f} ± {bleu_base['ci']:.2f})"
    )
    assert (
        f" {bleu_sys2['score']:.2f} ({bleu_sys2['mean']:.2f} ± {bleu_sys2['ci']:.2f}) "
        f"p={bleu_sys2['p_value']:.4f} " in lines[2]
    )
    assert lines[-3] == f"BLEU {result['signatures']['BLEU']}"


@pytest.mark.parametrize("empty", ["hyp", "ref", "second hyp"])
def test_empty_file_is_a_one_line_error(tmp_path, empty, capsys):
    paths = {name: tmp_path / name.replace(" ", "_") for name in ("hyp", "ref", "second hyp")}
    for name, path in paths.items():
        path.write_text("" if name == empty or (empty == "hyp" and name == "ref") else "ein Satz\n")
    argv = ["score", str(paths["hyp"]), str(paths["second hyp"]), "--ref", str(paths["ref"]), "--paired-bs"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"nmt-ls score: error: {paths[empty]} is empty\n"


def test_paired_test_needs_two_files(files, capsys):
    ref, base, _ = files
    assert main(["score", base, "--ref", ref, "--paired-ar"]) == 2
    assert "a paired test needs at least two hypothesis files" in capsys.readouterr().err


def test_read_lines_splits_at_newline_only(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("eins\u2028zwei\ndrei\x85vier\r\nf\x0cnf\x1c\x1d\x1e\v\n\n".encode())
    assert read_lines(path) == ["eins\u2028zwei", "drei\x85vier", "f\x0cnf\x1c\x1d\x1e\v", ""]
    assert split_lines("a\r\nb") == ["a", "b"] and split_lines("") == [] and split_lines("\n") == [""]
    assert split_lines("a\rb\n") == ["a\rb"]  # a lone CR is no line end


def test_write_lines_keeps_one_line_per_hypothesis(tmp_path):
    path = tmp_path / "out.txt"
    write_lines(path, ["a\nb", "c\r\nd", "e\rf", "g\u2028h"])
    assert path.read_bytes() == "a b\nc d\ne f\ng\u2028h\n".encode()
    buf = io.StringIO()
    write_lines(buf, ["x\ny"])
    assert buf.getvalue() == "x y\n"


def test_translate_keeps_the_line_count(tmp_path, monkeypatch, capsys):
    """3 input lines with U+2028, U+0085 and \\x0c inside give 3 output lines, even when a
    hypothesis holds a decoded newline."""
    seen = []

    def fake_translate(model, tok, lines, options, progress=False):
        seen.append(list(lines))
        return [line.replace("\x85", "\n") for line in lines]  # as a decoded <0x0A> byte piece would

    cfg = {"eval": {"beam_size": 1, "len_penalty": 1.0, "max_len_a": 1.2, "max_len_b": 10, "max_tokens": 100}}
    monkeypatch.setattr("nmt_ls.engines.load_for_inference", lambda path, device: (None, None, cfg))
    monkeypatch.setattr("nmt_ls.inference.translate", fake_translate)
    text = "ein\u2028Satz\nzwei\x85Sätze\ndrei\x0cSätze\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["translate", "ckpt.pt"]) == 0
    assert capsys.readouterr().out == "ein\u2028Satz\nzwei Sätze\ndrei\x0cSätze\n"
    src, out = tmp_path / "in.txt", tmp_path / "out.txt"
    src.write_text(text, encoding="utf-8")
    assert main(["translate", "ckpt.pt", "-i", str(src), "-o", str(out)]) == 0
    assert len(out.read_text(encoding="utf-8").split("\n")) == 4
    assert seen == [["ein\u2028Satz", "zwei\x85Sätze", "drei\x0cSätze"]] * 2
