"""Which engine decodes the test split (nmt_ls.scoring): the decoding probe times each engine on
the same sentences, greedy and with the beam, after an untimed warm-up; the faster at beam search
is chosen and named with both speeds. Engines here are fakes that spend time on a fake clock."""

import sys

import pytest

from nmt_ls import scoring
from nmt_ls.config import EvalConfig

from conftest import FakeClock

SRC = [f"sentence {i}" for i in range(8)]
OPTIONS = EvalConfig(beam_size=4)


def fake_engine(clock, greedy_s, beam_s, calls):
    """translate(lines, options) taking ``greedy_s`` or ``beam_s`` a line on ``clock``; each call's
    (lines, beam size) is appended to ``calls``."""

    def translate(lines, options, progress=False):
        calls.append((len(lines), options.beam_size))
        clock.advance(len(lines) * (greedy_s if options.beam_size == 1 else beam_s))
        return [line.upper() for line in lines]

    return translate


def probe(torch_s, ct2_s):
    """time_engines of a fake torch and a fake CTranslate2 taking (greedy, beam) seconds a line;
    returns (probe_s, the calls each engine got)."""
    clock, calls = FakeClock(), {"torch": [], "ctranslate2": []}
    translators = {
        "torch": fake_engine(clock, *torch_s, calls["torch"]),
        "ctranslate2": fake_engine(clock, *ct2_s, calls["ctranslate2"]),
    }
    return scoring.time_engines(translators, SRC, OPTIONS, clock), calls


def test_the_probe_times_each_engine_after_a_warm_up_and_chooses_the_faster_beam():
    probe_s, calls = probe(torch_s=(0.01, 0.03), ct2_s=(0.005, 0.0125))
    assert probe_s == {
        "torch": {"greedy": pytest.approx(0.01), "beam": pytest.approx(0.03)},
        "ctranslate2": {"greedy": pytest.approx(0.005), "beam": pytest.approx(0.0125)},
    }
    assert calls["torch"] == calls["ctranslate2"] == [(1, 4), (8, 1), (8, 4)]  # warm-up, greedy, beam
    assert scoring.faster_engine(probe_s) == "ctranslate2"
    assert scoring.probe_note("ctranslate2", probe_s) == "2.4x torch in the probe"


def test_beam_search_decides_even_where_greedy_is_faster_elsewhere():
    # CTranslate2 faster greedy, torch faster with the beam: torch, the beam dominating the test
    probe_s = probe(torch_s=(0.02, 0.03), ct2_s=(0.01, 0.045))[0]
    assert scoring.faster_engine(probe_s) == "torch"
    assert scoring.probe_note("torch", probe_s) == "1.5x ctranslate2 in the probe"


def test_a_tie_keeps_torch():
    probe_s = {"torch": {"greedy": 0.01, "beam": 0.02}, "ctranslate2": {"greedy": 0.01, "beam": 0.02}}
    assert scoring.faster_engine(probe_s) == "torch"


def test_without_ctranslate2_the_probe_times_torch_alone_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # import ctranslate2 raises ImportError
    translators = scoring.probe_translators(model=None, tok=None, model_cfg={}, device="cpu")
    assert list(translators) == ["torch"]
    probe_s = {"torch": {"greedy": 0.01, "beam": 0.02}}
    assert scoring.faster_engine(probe_s) == "torch"
    assert scoring.probe_note("torch", probe_s) == "ctranslate2 not installed"
    assert scoring.probe_note("", {}) == "no decoding probe chose it"


def test_on_a_gpu_the_probe_times_torch_alone(monkeypatch):
    monkeypatch.setattr(scoring.engines, "ctranslate2_available", lambda: True)
    assert list(scoring.probe_translators(model=None, tok=None, model_cfg={}, device="cuda")) == ["torch"]
    assert scoring.probe_note("torch", {"torch": {"greedy": 0.01, "beam": 0.02}}) == "the only engine probed"
