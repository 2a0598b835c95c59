"""train.amp: auto and train.num_threads: auto, chosen on the machine: float32 without a probe
where bf16 is not native, the probe's verdict where it is, bf16 on CUDA where supported."""

import logging

import pytest
import torch
import yaml

from nmt_ls import build, checkpoint, hardware
from nmt_ls import train as loop
from nmt_ls.config import load_recipe
from nmt_ls.hardware import choose_amp

from conftest import SMOKE_RECIPE, overrides

CPU = torch.device("cpu")


def no_probe(amp):
    raise AssertionError("probed on a CPU without native bf16")


def test_auto_without_native_bf16_picks_float32_without_probing(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX2")
    choice = choose_amp("auto", CPU, no_probe)
    assert (choice.amp, choice.reason) == ("none", "float32 (CPU AVX2, no native bf16)")


@pytest.mark.parametrize(("bf16_speed", "amp"), [(131.0, "bf16"), (105.0, "none"), (60.0, "none")])
def test_auto_with_native_bf16_follows_the_probe(monkeypatch, bf16_speed, amp):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: True)
    monkeypatch.setattr(hardware, "cpu_capability", lambda: "AVX512")
    speeds = {"none": 100.0, "bf16": bf16_speed}
    choice = choose_amp("auto", CPU, speeds.__getitem__)
    assert choice.amp == amp
    assert f"native bf16: bf16 at {bf16_speed / 100:.2f}x float32's tokens/s in a probe" in choice.reason


def test_auto_on_cuda_takes_bf16_where_supported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "H200")
    for native, amp in ((True, "bf16"), (False, "none")):
        monkeypatch.setattr(hardware, "native_bf16", lambda device, native=native: native)
        assert choose_amp("auto", torch.device("cuda"), no_probe).amp == amp


def test_explicit_bf16_without_native_support_warns(monkeypatch, caplog):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="nmt_ls.hardware"):
        assert choose_amp("bf16", CPU, no_probe).amp == "bf16"
    assert "without native bf16: autocast falls back to a slow path" in caplog.text
    with pytest.raises(ValueError, match="train.amp must be one of auto, none, bf16, got 'fp16'"):
        choose_amp("fp16", CPU)


def test_auto_threads_are_the_cores_shared_by_local_workers(monkeypatch):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(build, "usable_cores", hardware.usable_cores)
    assert build.num_threads("auto") == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert build.num_threads("auto") == build.num_threads(0) == 2
    assert build.num_threads(3) == 3


@pytest.mark.parametrize(("native", "bf16_faster", "amp"), [(False, True, "none"), (True, True, "bf16")])
def test_the_choice_is_logged_kept_in_the_checkpoint_and_on_resume(
    tmp_path, monkeypatch, caplog, native, bf16_faster, amp
):
    monkeypatch.setattr(hardware, "native_bf16", lambda device: native)
    monkeypatch.setattr(build, "native_bf16", lambda device: native)
    probed = []

    def tokens_per_second(run, batches, precision):
        probed.append((precision, len(batches)))
        return 200.0 if precision == "bf16" else 100.0

    monkeypatch.setattr(build, "tokens_per_second", tokens_per_second)
    args = overrides(tmp_path / "run", "train.amp='auto'", "train.max_updates=2", "train.num_threads='auto'")
    with caplog.at_level(logging.INFO, logger="nmt_ls.build"):
        summary = loop.train(load_recipe(SMOKE_RECIPE, args))
    assert f"amp auto: {'bf16' if amp == 'bf16' else 'float32'} (CPU " in caplog.text
    assert probed == ([("none", 2), ("bf16", 2)] if native else [])
    config = checkpoint.load(summary["checkpoint_last"])["config"]["train"]
    assert config["amp"] == amp and config["num_threads"] == hardware.usable_cores()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["amp"] == amp
    probed.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nmt_ls.build"):
        loop.train(load_recipe(SMOKE_RECIPE, [*args[:-2], "train.max_updates=3"]), resume=True)
    assert probed == [] and f"amp auto: {amp}, as the checkpoint was trained" in caplog.text


def test_probe_leaves_the_model_and_the_rng_as_they_were(tmp_path):
    run = build.setup(load_recipe(SMOKE_RECIPE, overrides(tmp_path / "run")), None)
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    rng = torch.get_rng_state()
    assert build.tokens_per_second(run, build.probe_batches(run), "none") > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in run.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
