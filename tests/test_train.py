"""End-to-end training on CPU: loss falls, ppl = exp(nll), checkpoints round-trip and resume."""

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from nmt_ls import checkpoint
from nmt_ls.config import load_recipe
from nmt_ls.engines import load_for_inference
from nmt_ls.train import train

ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests" / "data" / "lohelp_en_de"


def smoke_cfg(tmp_path, *overrides):
    return load_recipe(
        ROOT / "recipes" / "smoke.yaml",
        [
            f"out_dir={str(tmp_path / 'run')!r}",
            f"data.dir={str(FIXTURE)!r}",
            "data.valid_bleu_sentences=20",
            "tokenizer.vocab_size=500",
            *overrides,
        ],
    )


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    cfg = smoke_cfg(tmp, "train.max_updates=30", "train.log_every_updates=5", "train.validate_every_updates=15")
    return cfg, train(cfg)


def test_smoke_train_loss_falls_and_logs_ppl_of_nll(smoke_run):
    cfg, summary = smoke_run
    records = read_log(summary["log"])
    tr = [r for r in records if r["kind"] == "train"]
    va = [r for r in records if r["kind"] == "valid"]
    assert [r["update"] for r in tr] == [5, 10, 15, 20, 25, 30]
    assert [r["update"] for r in va] == [15, 30]
    assert tr[-1]["loss"] < tr[0]["loss"] - 0.5 and va[-1]["nll_loss"] < va[0]["nll_loss"]
    for r in records:
        assert r["ppl"] == pytest.approx(math.exp(r["nll_loss"]), rel=1e-12)
        assert r["ppl"] != pytest.approx(math.exp(r["loss"]), rel=1e-3)  # smoothing is on
    for r in tr:
        assert {"lr", "gnorm", "wps", "wpb", "bsz", "elapsed"} <= set(r)
    # the KL form is the smoothed loss minus H(q), a constant for fairseq's smoothing: eps/(V-1) off gold
    eps, v = cfg.criterion.label_smoothing, cfg.tokenizer.vocab_size
    entropy = -(1 - eps) * math.log(1 - eps) - eps * math.log(eps / (v - 1))
    for r in records:
        assert r["loss"] - r["kl"] == pytest.approx(entropy, rel=1e-6)  # float32 sums
        assert 0.0 < r["accuracy"] < 100.0
    assert "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:" in va[-1]["bleu_signature"]
    assert (Path(cfg.out_dir) / "config.yaml").exists()


def test_a_recipe_without_sizes_writes_its_own_model(smoke_run):
    cfg, summary = smoke_run
    written = yaml.safe_load((Path(cfg.out_dir) / "config.yaml").read_text())
    saved = checkpoint.load(summary["checkpoint_last"])["config"]
    for config in (written, saved):
        assert (config["size"], config["sizes"]) == ("auto", {})
        assert {k: config["model"][k] for k in ("d_model", "ffn_dim", "n_heads")} == {
            "d_model": 64,
            "ffn_dim": 128,
            "n_heads": 2,
        }


def test_checkpoint_round_trip_gives_identical_logits(smoke_run, tmp_path):
    cfg, summary = smoke_run
    ckpt = checkpoint.load(summary["checkpoint_last"])
    assert ckpt["update"] == 30 and ckpt["config"]["model"]["d_model"] == cfg.model.d_model
    model, tok, _ = load_for_inference(summary["checkpoint_last"])
    model2, _, _ = load_for_inference(summary["checkpoint_last"])
    src = torch.tensor([tok.encode("Click the Variables tab.") + [tok.eos_id]])
    tgt = torch.tensor([[tok.bos_id] + tok.encode("Klicken Sie")])
    assert torch.equal(model(src, tgt), model2(src, tgt))
    # the saved weights are the ones the model holds
    for k, v in model.state_dict().items():
        assert torch.equal(v, ckpt["model"][k])


def test_resume_continues_the_same_loss_curve(tmp_path):
    """A run stopped at update 6 and resumed gives, update for update, the log of a run that
    never stopped (same seed, CPU)."""
    common = ["train.log_every_updates=1", "train.save_every_updates=3", "model.dropout=0.2"]
    full = train(smoke_cfg(tmp_path / "a", "train.max_updates=12", *common))
    stopped_cfg = smoke_cfg(tmp_path / "b", "train.max_updates=6", *common)
    train(stopped_cfg)
    resumed = train(
        dataclasses.replace(stopped_cfg, train=dataclasses.replace(stopped_cfg.train, max_updates=12)), resume=True
    )
    a = [r for r in read_log(full["log"]) if r["kind"] == "train"]
    b = [r for r in read_log(resumed["log"]) if r["kind"] == "train"]
    assert [r["update"] for r in b] == list(range(1, 13))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6, abs=1e-9), ra["update"]
        assert ra["gnorm"] == pytest.approx(rb["gnorm"], rel=1e-5), ra["update"]
    wa = checkpoint.load(full["checkpoint_last"])["model"]
    wb = checkpoint.load(resumed["checkpoint_last"])["model"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


def write_copy_task(root: Path, n_train=1200, n_valid=100, seed=0):
    """A synthetic task with a known answer: the target is the source, word for word."""
    rng = random.Random(seed)
    words = [w * 2 for w in "abcdefghijklmnop"]
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_valid)):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(n)]
        for lang in ("en", "de"):
            (root / f"{split}.{lang}").write_text("\n".join(lines) + "\n")


def test_copy_task_drives_valid_ppl_near_one(tmp_path):
    data = tmp_path / "copy"
    data.mkdir()
    write_copy_task(data, n_train=4000, n_valid=50)
    cfg = smoke_cfg(
        tmp_path,
        f"data.dir={str(data)!r}",
        "tokenizer.vocab_size=280",
        "model.d_model=64",
        "model.ffn_dim=128",
        "model.n_heads=4",
        "model.enc_layers=2",
        "model.dec_layers=2",
        "model.dropout=0.0",
        "train.lr=0.003",
        "train.warmup_steps=30",
        "train.max_tokens=1000",
        "train.max_epochs=100",
        "train.max_updates=250",
        "train.validate_every_updates=0",
        "train.log_every_updates=50",
        "criterion.label_smoothing=0.0",
        "data.valid_bleu_sentences=50",
    )
    summary = train(cfg)
    valid = [r for r in read_log(summary["log"]) if r["kind"] == "valid"]
    assert valid[-1]["ppl"] < 1.1, valid
    assert valid[-1]["bleu"] > 80.0, valid
