"""tools/eval_valid.py end to end: a 2-update smoke run on a 20-pair valid split, then the tool on
its last checkpoint, whose teacher forcing must give what the run's final validation logged."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from nmt_ls.config import load_recipe
from nmt_ls.train import train

from conftest import FIXTURE, ROOT, SMOKE_RECIPE, overrides


def load_tool():
    spec = importlib.util.spec_from_file_location("eval_valid", ROOT / "tools" / "eval_valid.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def small_corpus(folder: Path, valid_lines: int) -> Path:
    """The fixture corpus with its valid and test splits cut to their first ``valid_lines``."""
    folder.mkdir()
    for split in ("train", "valid", "test"):
        for lang in ("en", "de"):
            lines = (FIXTURE / f"{split}.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
            (folder / f"{split}.{lang}").write_text("".join(lines[: None if split == "train" else valid_lines]))
    return folder


def test_eval_valid_gives_the_final_validation_of_the_run(tmp_path, capsys):
    data = small_corpus(tmp_path / "data", 20)
    extra = (f"data.dir={str(data)!r}", "data.valid_bleu_sentences=0", "train.max_updates=2")
    summary = train(load_recipe(SMOKE_RECIPE, overrides(tmp_path / "run", *extra)))
    logged = [json.loads(line) for line in Path(summary["log"]).read_text().splitlines()]
    valid = [r for r in logged if r["kind"] == "valid"][-1]
    assert valid["update"] == 2
    capsys.readouterr()

    out = tmp_path / "valid.json"
    assert load_tool().main([summary["checkpoint_last"], "--limit", "20", "--beam", "2", "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert (row["update"], row["params"], row["lines"], row["loss_pairs"]) == (2, summary["params"], 20, 20)
    assert row["ppl"] == pytest.approx(math.exp(row["nll_per_token"]), rel=1e-12)
    # the same pairs in the same batches as the run's validation: its nll, ppl and accuracy
    assert row["nll_per_token"] == pytest.approx(valid["nll_loss"], rel=1e-6)  # float32 sums, in other orders
    assert row["ppl"] == pytest.approx(valid["ppl"], rel=1e-6)
    assert row["accuracy"] == pytest.approx(valid["accuracy"], rel=1e-12)
    # (greedy BLEU is 0 after 2 updates, so comparing it with the run's says nothing)
    assert row["bleu_signature"] == valid["bleu_signature"] and row["beam_size"] == 2
    assert 0.0 <= row["ece"] <= 1.0 and 0.0 < row["mean_p_gold"] < 1.0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| checkpoint | updates | params | valid nll | ppl | ECE |")
    assert table[2].startswith(f"| {summary['checkpoint_last']} | 2 | {summary['params']:,} |")
    assert table[-2] == f"BLEU {valid['bleu_signature']}"


def test_eval_valid_names_a_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "none.pt"
    assert load_tool().main([str(missing)]) == 1
    assert capsys.readouterr().err == f"eval_valid.py: {missing}: checkpoint not found: {missing}\n"
