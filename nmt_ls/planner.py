"""The time planner: a budget of minutes becomes a number of updates for a wsd schedule.

A :class:`Planner` is given a clock, the schedule and a decoding probe. The loop tells it of each
update, validation, save and epoch start; from the update rate measured in windows of
``plan_window_updates`` updates (:class:`UpdateRate`), the seconds of a validation and the test
decoding still to come, it fixes the total updates (:func:`plan_total_updates`) whose cooldown
ends inside the budget, and it says when the time is up. Its state (:class:`PlanState`) is saved
flat in every checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# A plan aims at this share of train.max_minutes (less the test decoding's reserve), so that the
# estimates may be off a little and the run still ends inside the budget; past the budget it stops,
# cooldown done or not. A new plan replaces the one in force when it moves by more than PLAN_SLACK.
PLAN_TARGET, PLAN_SLACK = 0.97, 0.005
# Seconds kept after test decoding for scoring, the plot and the imports they need, and for loading
# the best checkpoint and exporting it to CTranslate2, which take about TAIL_SAVES checkpoint saves
# (on 2 cores: 5 s in all for a 45M-parameter model, whose save took 0.6 s; 1.2 s for 0.15M).
RUN_TAIL_S, TAIL_SAVES = 5.0, 4.0
# A window whose rate is off the run's by more than this share means the machine changed speed.
RATE_SHIFT = 0.25
# A re-plan leaves at least this share of the plan's cooldown (at least one update) to train: a late
# measurement that leaves no time cools down fast, in the slack PLAN_TARGET keeps, rather than
# stopping at the lr of now.
MIN_COOLDOWN_SHARE = 0.1


@dataclass(frozen=True)
class Cadence:
    """When validations come: every ``every`` updates (0: not by count), at each epoch end (the
    next at update ``next_epoch_end``, then every ``epoch_updates``; 0: none), and after the last
    update unless one came there already (or at ``validated_at``)."""

    every: int = 0
    epoch_updates: int = 0
    next_epoch_end: int = 0
    validated_at: int = -1

    def count(self, done: int, total: int) -> int:
        """Validations after update ``done`` up to and including update ``total``."""
        at = set()
        if self.every > 0:
            at.update(range((done // self.every + 1) * self.every, total + 1, self.every))
        if self.epoch_updates > 0:
            first = self.next_epoch_end
            if first <= done:
                first += (done - first) // self.epoch_updates * self.epoch_updates + self.epoch_updates
            at.update(range(first, total + 1, self.epoch_updates))
        final = total not in at and total != self.validated_at
        return len(at) + final


def plan_total_updates(
    seconds_left: float,
    per_update_s: float,
    updates_done: int,
    cadence: Cadence = Cadence(),
    validation_s: float = 0.0,
    max_total: int | None = None,
) -> int:
    """The total number of updates that fits a time budget, from a measured update rate.

    The result is ``d + n`` (``d = updates_done``) for the largest ``n >= 0`` with::

        n * per_update_s + cadence.count(d, d + n) * validation_s <= seconds_left

    capped at ``max_total`` (e.g. where ``train.max_epochs`` ends the run). ``seconds_left`` is
    what the budget leaves once the time so far and what follows training (test decoding) are
    taken off. If not even ``n = 0`` fits, the result is ``d``.

    Raises:
        ValueError: a rate, a time or a count is not positive where it must be.
    """
    if per_update_s <= 0:
        raise ValueError(f"the measured seconds per update must be > 0, got {per_update_s}")
    if min(updates_done, validation_s) < 0:
        raise ValueError(f"updates_done and validation_s must be >= 0, got {updates_done}, {validation_s}")

    def cost(n: int) -> float:
        return n * per_update_s + cadence.count(updates_done, updates_done + n) * validation_s

    if cost(0) > seconds_left:
        return updates_done
    lo, hi = 0, int(max(seconds_left, 0.0) / per_update_s) + 1  # cost(lo) <= left < cost(hi): cost(n) >= n * s_u
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost(mid) <= seconds_left else (lo, mid)
    total = updates_done + lo
    return total if max_total is None else max(updates_done, min(total, max_total))


@dataclass(frozen=True)
class Runway:
    """What is left of the run in updates, as the loop sees it when the plan is fixed."""

    done: int  # updates done
    epoch_left: int  # updates left in the current epoch
    per_epoch: int  # updates in a whole epoch
    epochs_after: int  # whole epochs after the current one that train.max_epochs allows
    every: int = 0  # train.validate_every_updates
    validated_at: int = -1  # update of the last validation

    @property
    def cadence(self) -> Cadence:
        return Cadence(self.every, self.per_epoch, self.done + self.epoch_left, self.validated_at)

    @property
    def max_total(self) -> int:
        """The update at which train.max_epochs ends the run."""
        return self.done + self.epoch_left + self.epochs_after * self.per_epoch


@dataclass
class PlanState:
    """What the planner has measured and fixed; saved flat in every checkpoint."""

    elapsed: float = 0.0  # seconds of the run so far: set-up, updates, validations (of every process)
    planned_updates: int = 0  # the total fixed from the measured update rate (0: not yet)
    update_s: float = 0.0  # seconds per update over the last timed window (0: not measured yet)
    validation_s: float = 0.0  # seconds of the last validation with its saves (0: not measured yet)
    greedy_s: float = 0.0  # our torch search's seconds per sentence, greedy, at the last validation or probe
    beam_ratio: float = 0.0  # its beam search's seconds over greedy's on the same sentences
    test_engine: str = ""  # the engine that decodes the test split, chosen by the probe ("": not yet)
    probe_s: dict = field(default_factory=dict)  # {engine: {"greedy": s, "beam": s}} per sentence in the probe


@dataclass(frozen=True)
class Budget:
    """The time a run may take and how its schedule is planned in it (``train.*`` settings)."""

    max_minutes: float = 0.0  # 0: no time limit
    planning: bool = False  # wsd without a pinned max_updates: the total is planned from the budget
    window_updates: int = 20  # train.plan_window_updates
    warmup_steps: int = 0  # the recipe's warmup, at most max_warmup_fraction of the planned run
    max_warmup_fraction: float = 0.1
    test_sentences: int = 0  # sentences decoded after training (`nmt-ls run`): their time is reserved

    @classmethod
    def of(cls, train, test_sentences: int = 0) -> Budget:
        """The budget of a ``TrainConfig``."""
        planning = train.lr_scheduler == "wsd" and train.max_updates <= 0 and train.max_minutes > 0
        fields = ("max_minutes", "warmup_steps", "max_warmup_fraction")
        kw = {name: getattr(train, name) for name in fields}
        return cls(planning=planning, window_updates=train.plan_window_updates, test_sentences=test_sentences, **kw)


@dataclass(frozen=True)
class Probe:
    """Decoding speed measured before the first validation (see :meth:`Planner.plan`)."""

    greedy_s: float  # our torch search's seconds per sentence, greedy
    beam_ratio: float  # its beam search's seconds over greedy's
    validation_s: float  # seconds of a validation (0: not measured)
    test_engine: str = ""  # the faster engine at beam search, for the test split ("": none chosen)
    probe_s: dict = field(default_factory=dict)  # each engine's seconds per sentence (PlanState.probe_s)


class UpdateRate:
    """Seconds per update, measured in windows of ``window_updates`` updates: the mean over every
    window since the rate last shifted (a window off that mean by more than ``RATE_SHIFT``, when
    the machine slows down or speeds up, starts the mean again). The mean of a steady machine
    settles, so the plans made from it do too, where each window's own rate would scatter them."""

    def __init__(self, window_updates: int):
        self.window_updates = window_updates
        self.window, self.window_s = 0, 0.0  # updates and seconds of the window being filled
        self.updates, self.seconds = 0, 0.0  # of the windows since the last shift

    def add(self, seconds: float) -> float | None:
        """One more update of ``seconds``; the seconds per update when it fills a window, else None."""
        self.window, self.window_s = self.window + 1, self.window_s + seconds
        if self.window < self.window_updates:
            return None
        window_rate = self.window_s / self.window
        if self.updates and abs(window_rate * self.updates / self.seconds - 1) > RATE_SHIFT:
            self.updates, self.seconds = 0, 0.0
        self.updates, self.seconds = self.updates + self.window, self.seconds + self.window_s
        self.window, self.window_s = 0, 0.0
        return self.seconds / self.updates


class Planner:
    """Plans a wsd schedule's total updates from a time budget, measured on the clock.

    Args:
        budget (Budget): the minutes and the planning settings.
        scheduler: the run's lr schedule; a plan is fixed with ``set_total_updates`` (wsd only).
        state (PlanState): measurements and plan so far (a resumed run's from its checkpoint).
        clock (callable): seconds now, e.g. ``time.time``; tests pass a fake one.
        probe (callable): ``probe(need_validation) -> Probe``, decoding a few sentences.
        world: ``broadcast`` (rank 0's value on every worker), ``any`` (a flag on every worker) and
        ``wait_for_main`` (the other workers wait while rank 0 probes decoding alone).
    """

    def __init__(self, budget: Budget, scheduler, state: PlanState, clock: Callable[[], float], probe, world):
        self.budget, self.scheduler, self.state = budget, scheduler, state
        self.clock, self.probe, self.world = clock, probe, world
        self.origin = clock() - state.elapsed  # when the run, all its processes together, started
        self.rate = UpdateRate(budget.window_updates)
        self.skip = 1  # the first update of a process is not timed (allocations, kernel choice)
        self.save_s = 0.0  # seconds of one checkpoint save, the last measured
        self.refit = False  # resumed with another budget: the next plan re-fits the schedule
        self.stopped = False  # training is over (see stop)

    def start(self, started: float) -> None:
        """The budget counts from ``started`` (the command's start, on the clock), set-up included."""
        self.origin = started - self.state.elapsed

    def tick(self) -> float:
        """Seconds of the run so far (also kept in the state)."""
        self.state.elapsed = self.clock() - self.origin
        return self.state.elapsed

    def reserve_s(self) -> float:
        """Seconds kept after training for decoding the test set greedy and with beam search, then
        loading, exporting and scoring the best checkpoint (``RUN_TAIL_S``, ``TAIL_SAVES``)."""
        if not self.budget.test_sentences:
            return 0.0
        return self.budget.test_sentences * self.test_sentence_s() + RUN_TAIL_S + TAIL_SAVES * self.save_s

    def test_sentence_s(self) -> float:
        """Seconds per test sentence, greedy and beam search together, on the engine chosen for the
        test split: its seconds in the probe, scaled as our torch search's speed moved since (each
        validation measures torch's greedy decoding)."""
        s = self.state
        torch_s = s.greedy_s * (1 + s.beam_ratio)
        chosen, probed = s.probe_s.get(s.test_engine), s.probe_s.get("torch")
        if not (chosen and probed and probed["greedy"] > 0):
            return torch_s
        return sum(chosen.values()) * s.greedy_s / probed["greedy"]

    def deadline_s(self) -> float:
        """Seconds into the run by which training must have stopped (inf without a budget)."""
        return 60 * self.budget.max_minutes - self.reserve_s() if self.budget.max_minutes > 0 else math.inf

    def time_up(self) -> bool:
        """Is the deadline past (on any worker)?"""
        return self.world.any(self.state.elapsed >= self.deadline_s())

    def on_update(self, seconds: float, runway: Runway) -> None:
        """One update took ``seconds``: when a window is full, the run's rate (:class:`UpdateRate`,
        rank 0's on every worker) is measured again and the plan is fixed again."""
        if self.skip:
            self.skip -= 1
            return
        if (update_s := self.rate.add(seconds)) is not None:
            self.state.update_s = self.world.broadcast(update_s)
            self.plan(runway)

    def on_validation(self, seconds: float, greedy_s: float, runway: Runway) -> None:
        """A validation took ``seconds`` and decoded at ``greedy_s`` a sentence (rank 0's, with
        its last save's seconds, on every worker)."""
        self.state.validation_s, self.state.greedy_s = self.world.broadcast((seconds + self.save_s, greedy_s))
        self.choose_test_engine()
        self.plan(runway)

    def on_save(self, seconds: float) -> None:
        """One checkpoint save took ``seconds`` (rank 0's, which writes it, on every worker)."""
        self.save_s = self.world.broadcast(seconds)

    def plan(self, runway: Runway) -> None:
        """Fix the total updates whose cooldown ends at ``PLAN_TARGET`` of the budget, less the
        test decoding's reserve, from the last measured rate (validations to come counted; capped
        where ``max_epochs`` ends the run). A plan that moves by more than ``PLAN_SLACK`` replaces
        the one in force (from the lr of now if its cooldown has begun), but never ends the run
        sooner than :meth:`shortest_total`; once training is over (:meth:`over`) the plan stays
        the one trained. The first plan also sizes the warmup: at most ``max_warmup_fraction`` of
        the run. Every worker takes rank 0's plan."""
        s, b = self.state, self.budget
        if not b.planning or s.update_s <= 0:
            return
        self.tick()
        if self.over(runway.done):
            return
        if not s.validation_s or (b.test_sentences and not s.test_engine):
            self.measure_decoding()
        seconds_left = PLAN_TARGET * 60 * b.max_minutes - self.reserve_s() - s.elapsed
        total = plan_total_updates(
            seconds_left, s.update_s, runway.done, runway.cadence, s.validation_s, runway.max_total
        )
        total = max(self.world.broadcast(total), self.shortest_total(runway.done))
        if s.planned_updates and abs(total - s.planned_updates) <= PLAN_SLACK * s.planned_updates and not self.refit:
            return
        self.fix(total, runway.done)

    def stop(self) -> None:
        """Training is over (the loop stopped, for whatever reason): later measurements, such as
        the last validation's, leave the plan as it was trained, so the checkpoint holds it."""
        self.stopped = True

    def over(self, done: int) -> bool:
        """Is training over: stopped, or the plan's last update trained (unless a resumed run is
        to re-fit the plan to a new budget)?"""
        planned = self.state.planned_updates
        return self.stopped or (planned > 0 and done >= planned and not self.refit)

    def shortest_total(self, done: int) -> int:
        """The total below which a re-plan after update ``done`` may not go: ``MIN_COOLDOWN_SHARE``
        of the planned cooldown (at least one update) from now, so that the lr still cools down to
        ``end_lr``, or the plan in force if it ends sooner; ``done`` before the first plan."""
        planned = self.state.planned_updates
        if not planned:
            return done
        cooldown = round(self.scheduler.cooldown_fraction * planned)
        return min(planned, done + max(1, math.ceil(MIN_COOLDOWN_SHARE * cooldown)))

    def choose_test_engine(self) -> None:
        """Probe decoding, if the run decodes a test split and no probe chose its engine yet: at
        the first plan or validation, whichever comes first, so that every checkpoint holds the
        choice; at the end of a run resumed from a checkpoint without one."""
        if self.budget.test_sentences and not self.state.test_engine:
            self.measure_decoding()

    def measure_decoding(self) -> None:
        """Decoding speed (and a validation's seconds, if none was measured) from the probe, and
        the engine it chose for the test split (rank 0's on every worker)."""
        s = self.state
        probe = self.probe(not s.validation_s)
        self.world.wait_for_main()
        probe = self.world.broadcast(probe)
        s.greedy_s, s.beam_ratio = probe.greedy_s, probe.beam_ratio
        s.validation_s = probe.validation_s or s.validation_s
        if probe.test_engine:
            s.test_engine, s.probe_s = probe.test_engine, probe.probe_s
            beam_s = ", ".join(f"{name} {seconds['beam']:.4f} s" for name, seconds in s.probe_s.items())
            log.info(
                "decoding probe: the test split is decoded by %s (beam search: %s a sentence)", s.test_engine, beam_s
            )

    def fix(self, total: int, done: int) -> None:
        """Set the schedule's total (and on the first plan its warmup) and log the plan."""
        s, sched = self.state, self.scheduler
        cooldown_start = total - round(sched.cooldown_fraction * total)
        if s.planned_updates:
            warmup = min(sched.warmup_steps, cooldown_start)
        else:
            fraction = round(self.budget.max_warmup_fraction * total)
            warmup = min(self.budget.warmup_steps, max(done + 1, fraction), cooldown_start)
        sched.set_total_updates(total, max(warmup, 0), refit=self.refit)
        first, s.planned_updates, self.refit = not s.planned_updates, total, False
        log.info(
            "wsd %s: %d updates in train.max_minutes=%g (%.3f s per update, %.1f s per validation, %.0f s "
            "kept for test decoding); warmup %d, cooldown from update %d; pin it with train.max_updates=%d "
            "train.warmup_steps=%d",
            "plan" if first else "re-plan",
            total,
            self.budget.max_minutes,
            s.update_s,
            s.validation_s,
            self.reserve_s(),
            sched.warmup_steps,
            sched.cooldown_start,
            total,
            sched.warmup_steps,
        )
