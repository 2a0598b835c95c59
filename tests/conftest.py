from pathlib import Path

import pytest
import torch

from nmt_ls.criterions import register_criterion
from nmt_ls.criterions.label_smoothed import LabelSmoothedCrossEntropyCriterion


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny models gain nothing from a second thread, and on a busy machine two threads
    # spin-wait on each other (a 0.1 s test took 10 s at load 5 on 2 cores). Restoring the
    # count afterwards also undoes train()'s torch.set_num_threads from one test to the next.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ROOT = Path(__file__).parent.parent
FIXTURE = ROOT / "tests" / "data" / "lohelp_en_de"
SMOKE_RECIPE = str(ROOT / "recipes" / "smoke.yaml")


def overrides(out_dir, *extra: str) -> list[str]:
    """Dotted overrides that point the smoke recipe at the fixture corpus and ``out_dir``."""
    return [
        f"out_dir={str(out_dir)!r}",
        f"data.dir={str(FIXTURE)!r}",
        "data.valid_bleu_sentences=5",
        "tokenizer.vocab_size=500",
        "train.num_threads=1",
        "train.amp='none'",  # no precision probe in every tiny run (tests/test_hardware.py tests auto)
        *extra,
    ]


# A plugin criterion whose loss is NaN at the training calls numbered in ``bad`` (a set or range
# expression); ``name`` is both its module and its registered name.
NAN_PLUGIN = """
from nmt_ls.criterions import register_criterion
from nmt_ls.criterions.label_smoothed import LabelSmoothedCrossEntropyCriterion

@register_criterion("{name}")
class NaNAt(LabelSmoothedCrossEntropyCriterion):
    calls = 0
    def compute(self, logits, target, reduction="sum"):
        out = super().compute(logits, target, reduction)
        if logits.requires_grad:  # training, not validation
            NaNAt.calls += 1
            if NaNAt.calls in {bad}:
                out.loss = out.loss * float("nan")
        return out
"""


class FakeClock:
    """``time`` for the loop: it moves only when an update or a validation runs (``advance``)."""

    def __init__(self):
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    perf_counter = __call__ = time

    def advance(self, seconds: float):
        self.now += seconds


@register_criterion("clocked_label_smoothed")
class ClockedCriterion(LabelSmoothedCrossEntropyCriterion):
    """The label-smoothed criterion on a fake clock: the n-th training forward pass of a process
    takes ``update_s(n)`` seconds (n from 0), each valid batch ``valid_s``. Set by the ``clocked``
    fixture; the loop itself runs as it is, on ``train(cfg, clock=clock)``."""

    clock: FakeClock | None = None
    update_s = staticmethod(lambda n: 0.1)
    valid_s = 0.1
    forwards = 0  # this criterion's training forward passes (set on the instance from the first)

    def forward(self, model, sample, reduce=True):
        if model.training:
            self.clock.advance(self.update_s(self.forwards))
            self.forwards += 1
        else:
            self.clock.advance(self.valid_s)
        return super().forward(model, sample, reduce)


@pytest.fixture
def clocked(monkeypatch):
    """``train(cfg, clock)`` on a fake clock, its time spent by the clocked criterion: call with
    the out_dir, overrides, ``update_s`` (seconds of the n-th update) and ``train``'s arguments;
    returns (cfg, summary)."""
    from nmt_ls.config import load_recipe
    from nmt_ls.train import train

    clock = FakeClock()
    monkeypatch.setattr(ClockedCriterion, "clock", clock)

    def run(out_dir, *extra, update_s=lambda n: 0.1, **kwargs):
        monkeypatch.setattr(ClockedCriterion, "update_s", staticmethod(update_s))
        cfg = load_recipe(SMOKE_RECIPE, overrides(out_dir, "criterion.name='clocked_label_smoothed'", *extra))
        return cfg, train(cfg, clock=clock, **kwargs)

    run.clock = clock
    return run
