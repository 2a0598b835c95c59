"""The training loop, written out: batches -> criterion(net, sample) -> Adam, validate, save.

:func:`train` builds the run once (:func:`nmt_ls.build.setup`), restores its states
(:func:`nmt_ls.resume.restore`) and runs a :class:`Trainer`, which advances two states alone:
the :class:`~nmt_ls.resume.TrainState` (update, epoch, position in the epoch, best) and the
planner's :class:`~nmt_ls.planner.PlanState`. Training and validation make the same call,
``loss, sample_size, logging_output = criterion(net, sample)`` (fairseq's ``train_step`` and
``valid_step``); logging outputs are summed over an update's batches and workers by one collective
and become every log line through :mod:`nmt_ls.metrics`. Under ``torchrun`` each worker trains
on its shard of the batches with DistributedDataParallel: the loss of an update is summed over
the update's target tokens on *all* workers and divided by their global count, so K workers take
the same step as one worker on the same batches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn
from tqdm import tqdm

from nmt_ls import checkpoint, scoring
from nmt_ls.batching import untrained_batches, update_size, updates_left
from nmt_ls.build import Built, check_config, choose_precision, describe, setup, to_sample
from nmt_ls.config import RunConfig, to_dict
from nmt_ls.evaluate import corpus_bleu
from nmt_ls.hardware import release_freed_memory
from nmt_ls.inference import translate
from nmt_ls.metrics import postfix, train_record, valid_record
from nmt_ls.planner import Budget, Planner, Probe, Runway
from nmt_ls.resume import TrainState, load_last, restore, saved_states

log = logging.getLogger(__name__)

# Valid sentences decoded (greedy and beam) to estimate decoding speed before the first validation.
DECODE_PROBE_SENTENCES = 32
# Every this many updates the heap's free pages go back to the system (see release_freed_memory):
# under bf16 autocast every update (a 2-core AVX-512 BF16 CPU: peak RSS 1.48 GB in 123 updates
# instead of 2.37 GB, at 0.91x the tokens/s; every 10 updates, a whole run still peaked at 2.42 GB).
TRIM_EVERY = {"bf16": 1, "none": 10}


def train(
    cfg: RunConfig,
    resume: bool = False,
    started: float | None = None,
    test_split: bool = False,
    clock: Callable[[], float] = time.time,
) -> dict:
    """Train as ``cfg`` says; returns a summary (updates, best metric, paths, minutes).

    With ``resume``, continue from ``out_dir/checkpoint_last.pt`` exactly where it stopped:
    same data position, RNG states, optimizer and schedule, so the loss curve continues as if
    the run had never stopped. ``train.max_minutes`` counts from ``started`` (default: now, on
    ``clock``), set-up included. With ``test_split`` (``nmt-ls run``) the test split is read at
    set-up, the time to decode it after training is kept out of the budget, and the summary
    carries its pairs (``test_pairs``, main worker) to scoring.
    """
    started = clock() if started is None else started
    check_config(cfg)  # before any data work
    cfg, ckpt = load_last(cfg) if resume else (cfg, None)
    built = setup(cfg, ckpt, test_split, clock, started)
    try:
        state, plan, refit = restore(built, ckpt)
        built = choose_precision(built, ckpt)
        describe(built)
        trainer = Trainer(built, state, plan, clock)
        trainer.planner.start(started)
        trainer.planner.refit = refit
        return trainer.train()
    finally:
        built.release()  # out_dir is free for the next run, however this one ended


class Trainer:
    """The loop over epochs and updates of a run set up once (``built``)."""

    def __init__(self, built: Built, state: TrainState, plan, clock: Callable[[], float]):
        self.built, self.state, self.clock = built, state, clock
        # the main worker alone reads the test split; every worker plans for its decoding alike
        budget = Budget.of(built.cfg.train, built.world.broadcast(len(built.test_pairs)))
        self.planner = Planner(budget, built.scheduler, plan, clock, self.probe_decoding, built.world)
        self.epoch_batches = 0  # the current epoch's batches, all workers' together
        self.outputs: list[dict] = []  # the updates' logging outputs since the last train line
        self.line_start = clock()
        self.bad_updates = 0  # non-finite updates in a row

    # ---- the loop ---------------------------------------------------------------------------

    def train(self) -> dict:
        b, s, t = self.built, self.state, self.built.cfg.train
        b.model.train()
        self.check_time_left()
        while True:
            data = b.train_data
            batches = untrained_batches(data.src_lens, data.tgt_lens, t.max_tokens, t.seed, s.epoch, s.earlier_budgets)
            if len(batches) < b.world.world_size:
                n, k = len(batches), b.world.world_size
                raise ValueError(f"train.max_tokens={t.max_tokens} makes {n} batches an epoch, too few for {k} workers")
            self.epoch_batches = len(batches)
            self.planner.plan(self.runway())  # from the rate measured so far, for this epoch's length
            if (reason := self.stop_reason()) is not None or (reason := self.train_epoch(batches)) is not None:
                break
            # the epoch is over, whatever its last update did
            s.epoch, s.global_batch, s.earlier_budgets = s.epoch + 1, 0, []
            if s.validated_at != s.update:
                self.validate_and_save()
        self.planner.stop()  # the last validation leaves the plan as trained
        if s.validated_at != s.update:
            self.validate_and_save()
        self.planner.choose_test_engine()  # resumed from a checkpoint that holds no choice
        if b.writer:
            b.writer.close()
        return self.summarize(reason)

    def check_time_left(self) -> None:
        """A run whose ``train.max_minutes`` is spent before its first update (by the set-up and
        the seconds kept after training) stops here, in one line, rather than decode and score an
        untrained model; what the set-up built (tokenizer, binarized data) is kept for the next try."""
        p, minutes = self.planner, self.built.cfg.train.max_minutes
        p.tick()
        if self.state.update == 0 and p.time_up():
            kept = f" and {p.reserve_s():.0f} s are kept for decoding the test split" if p.budget.test_sentences else ""
            raise ValueError(
                f"train.max_minutes={minutes:g} ({60 * minutes:.0f} s) leaves no time to train: the set-up took "
                f"{p.state.elapsed:.0f} s{kept}; raise train.max_minutes"
            )

    def train_epoch(self, batches: list) -> str | None:
        """Train on the epoch's ``batches`` (all workers', in the same order on each) from
        ``state.global_batch`` on, each worker on its shard of every update's batches
        (:func:`~nmt_ls.batching.update_size`), until the epoch ends (None) or
        :meth:`stop_reason` says stop (returned)."""
        b, s, t = self.built, self.state, self.built.cfg.train
        world, per_epoch = b.world, self.epoch_updates(len(batches))
        bar = tqdm(
            total=per_epoch,
            initial=per_epoch - self.epoch_updates(len(batches), s.global_batch),
            desc=f"epoch {s.epoch + 1}",
            disable=not world.is_main,
            mininterval=2.0,
            unit="upd",
        )
        reason = None
        while (n := update_size(len(batches), s.global_batch, world.world_size, t.update_freq)) and (
            reason := self.stop_reason()
        ) is None:
            group = world.shard(batches[s.global_batch : s.global_batch + n])
            step_start = self.clock()
            output = self.train_step([self.sample(idx) for idx in group])
            s.global_batch += n
            self.planner.tick()
            bar.update(1)
            if output is None:
                self.skip_bad_update()
                continue
            self.bad_updates, s.update = 0, s.update + 1
            if s.update % TRIM_EVERY[t.amp] == 0 and world.device.type == "cpu":
                release_freed_memory()
            self.planner.on_update(self.clock() - step_start, self.runway())
            record = self.after_update(output)
            if record:
                bar.set_postfix(postfix(record))
        bar.close()
        return reason

    def sample(self, idx: list[int]) -> dict:
        """The train pairs ``idx`` as a sample on the run's device."""
        b, tok = self.built, self.built.tok
        return to_sample(b.train_data.batch(idx, tok.pad_id, tok.bos_id, tok.eos_id), b.world.device)

    def train_step(self, samples: list[dict]) -> dict | None:
        """Forward/backward over the update's samples, then one optimizer step: the update's
        logging output, summed over its samples and all workers, with ``gnorm`` and ``lr``; None
        (and no step) when the loss or the gradient is not finite on some worker."""
        b, world, t = self.built, self.built.world, self.built.cfg.train
        local_size = sum(b.criterion.sample_size(sample) for sample in samples)
        global_size = world.all_reduce_sum([float(local_size)])[0]
        scale = world.world_size / max(global_size, 1.0)  # DDP averages gradients over workers
        outputs = []
        for i, sample in enumerate(samples):
            sync = i == len(samples) - 1 or world.world_size == 1
            with nullcontext() if sync else b.net.no_sync():
                with b.autocast():
                    loss, _, logging_output = b.criterion(b.net, sample)
                (loss * scale).backward()
            outputs.append(logging_output)
        output = sum_outputs(outputs, world)
        gnorm = float(nn.utils.clip_grad_norm_(b.model.parameters(), t.clip_norm if t.clip_norm > 0 else math.inf))
        if not (math.isfinite(output["loss"]) and math.isfinite(gnorm)):
            b.optimizer.zero_grad(set_to_none=True)
            return None
        lr = b.optimizer.param_groups[0]["lr"]
        b.optimizer.step()
        b.scheduler.step()
        b.optimizer.zero_grad(set_to_none=True)
        return {**output, "gnorm": gnorm, "lr": lr}

    def skip_bad_update(self) -> None:
        self.bad_updates += 1
        update, limit = self.state.update + 1, self.built.cfg.train.max_bad_updates
        log.warning("update %d: non-finite loss or gradient, batch skipped (%d in a row)", update, self.bad_updates)
        if self.bad_updates >= limit:
            raise FloatingPointError(
                f"{self.bad_updates} consecutive non-finite updates at update {update}; stopping (lower train.lr?)"
            )

    def after_update(self, output: dict) -> dict | None:
        """Log, validate and save as the recipe says, after update ``state.update``; returns
        the train record if one was written."""
        s, t = self.state, self.built.cfg.train
        self.outputs.append(output)
        record = None
        if s.update % t.log_every_updates == 0 or self.epoch_trained():
            record = self.log_train()
        if t.validate_every_updates and s.update % t.validate_every_updates == 0:
            self.validate_and_save()
        elif t.save_every_updates and s.update % t.save_every_updates == 0:
            self.save("checkpoint_last.pt")
        return record

    def log_train(self) -> dict | None:
        """Write the train line of the updates since the last one, if there are any: every
        ``log_every_updates``, at an epoch's end and before every save, so that the log cut back
        to a checkpoint's update on ``--resume`` holds the lines of an uninterrupted run."""
        b, s = self.built, self.state
        if not self.outputs:
            return None
        epoch = s.epoch + (1.0 if self.epoch_trained() else s.global_batch / self.epoch_batches)
        seconds = self.clock() - self.line_start
        record = train_record(s.update, epoch, self.outputs, seconds, self.planner.state.elapsed)
        if b.writer:
            b.writer.write(record)
        self.outputs, self.line_start = [], self.clock()
        return record

    def epoch_trained(self) -> bool:
        """Whether the current epoch has no update left (its last batches, fewer than the
        workers, are dropped)."""
        b, t = self.built, self.built.cfg.train
        return update_size(self.epoch_batches, self.state.global_batch, b.world.world_size, t.update_freq) == 0

    def runway(self) -> Runway:
        """What is left of the run, in updates, for the planner."""
        s, t = self.state, self.built.cfg.train
        per_epoch = self.epoch_updates(self.epoch_batches)
        epoch_left = self.epoch_updates(self.epoch_batches, s.global_batch)
        epochs_after = t.max_epochs - s.epoch - 1
        return Runway(s.update, epoch_left, per_epoch, epochs_after, t.validate_every_updates, s.validated_at)

    def epoch_updates(self, n_batches: int, done: int = 0) -> int:
        """Updates the loop makes in an epoch of ``n_batches`` (all workers' together) once its
        first ``done`` are trained (:func:`~nmt_ls.batching.updates_left`, as ``update_size`` steps)."""
        return updates_left(n_batches, done, self.built.world.world_size, self.built.cfg.train.update_freq)

    def stop_reason(self) -> str | None:
        """Why training must stop now (the same answer on every worker), or None."""
        t, s, plan = self.built.cfg.train, self.state, self.planner.state
        if t.max_updates > 0 and s.update >= t.max_updates:
            return f"reached train.max_updates={t.max_updates}"
        if plan.planned_updates and s.update >= plan.planned_updates:
            return f"reached the {plan.planned_updates} updates planned for train.max_minutes={t.max_minutes}"
        if s.epoch >= t.max_epochs:
            return f"reached train.max_epochs={t.max_epochs}"
        if t.patience > 0 and s.bad_validations >= t.patience:
            return f"early stop: no improvement of {t.best_metric} in {t.patience} validations"
        if self.planner.time_up():
            if plan.planned_updates:
                log.warning(
                    "stopped at train.max_minutes=%g at update %d of the %d planned: the cooldown is cut short",
                    t.max_minutes,
                    s.update,
                    plan.planned_updates,
                )
            reserve = f", less {self.planner.reserve_s():.0f} s kept for test decoding" if self.built.test_pairs else ""
            return f"reached train.max_minutes={t.max_minutes}{reserve}"
        return None

    # ---- validation and checkpoints -----------------------------------------------------------

    @torch.no_grad()
    def validation_outputs(self) -> list[dict]:
        """The criterion's logging outputs over the valid batches, as training computes them (the
        chunked criterion from decoder features, never forming the logits). It runs on the main
        worker alone, so never through DDP, and in float32."""
        b = self.built
        b.model.eval()
        outputs = [b.criterion(b.model, to_sample(batch, b.world.device))[2] for batch in b.valid.batches]
        b.model.train()
        return outputs

    def validate(self) -> tuple[dict, float]:
        """(the valid record: loss, nll, KL, ppl, accuracy and greedy BLEU on the first valid
        pairs; greedy decoding's seconds per sentence, the last measured if none were decoded)."""
        b, s, valid = self.built, self.state, self.built.valid
        outputs = self.validation_outputs()
        e, start = b.cfg.eval, self.clock()
        hyps = translate(b.model, b.tok, valid.bleu_src, dataclasses.replace(e, beam_size=1))
        greedy_s = (self.clock() - start) / len(valid.bleu_src) if valid.bleu_src else self.planner.state.greedy_s
        bleu, signature = corpus_bleu(hyps, valid.bleu_ref)
        bleu_result = (bleu, signature, len(valid.bleu_src))
        record = valid_record(s.update, s.epoch, outputs, bleu_result, self.planner.state.elapsed)
        if valid.bleu_src:
            log.info("example | src: %s | hyp: %s | ref: %s", valid.bleu_src[0], hyps[0], valid.bleu_ref[0])
        return record, greedy_s

    def validate_and_save(self) -> None:
        """Validate (main worker), track the best value, fix the plan again from the validation's
        time, and save best and last (all workers), so the checkpoint holds the plan in force."""
        b, s = self.built, self.state
        self.log_train()  # before the valid line of the same update
        start, improved, greedy_s = self.clock(), False, 0.0
        if b.world.is_main:
            record, greedy_s = self.validate()
            b.writer.write(record)
            value = record["bleu"] if b.cfg.train.best_metric == "bleu" else -record["ppl"]
            improved = s.best is None or value > s.best
            s.best = value if improved else s.best
        b.world.wait_for_main()
        s.best, improved = b.world.broadcast((s.best, improved))
        s.bad_validations = 0 if improved else s.bad_validations + 1
        s.validated_at = s.update
        self.planner.on_validation(self.clock() - start, greedy_s, self.runway())
        start = self.clock()
        if improved:
            self.save("checkpoint_best.pt")
        self.save("checkpoint_last.pt")
        self.planner.on_save((self.clock() - start) / (1 + improved))

    def save(self, name: str) -> None:
        """Write ``out_dir/name`` atomically (main worker); every worker must call it, since the
        checkpoint holds every worker's RNG states."""
        b = self.built
        self.log_train()  # the log holds every update that the checkpoint holds
        rngs = b.world.gather(checkpoint.rng_state())
        if b.world.is_main:
            states = saved_states(self.state, self.planner.state)
            stateful = {"model": b.model, "optimizer": b.optimizer, "scheduler": b.scheduler}
            ckpt = checkpoint.training_state(stateful, to_dict(b.cfg), b.out_dir / "spm.model", states, rngs)
            checkpoint.atomic_save(ckpt, b.out_dir / name)
        b.world.wait_for_main()

    def probe_decoding(self, need_validation: bool) -> Probe:
        """At the first plan (or, for the test split's engine, the first validation), what the
        plan needs from decoding a few valid sentences greedy and with beam search: our torch
        search's seconds per sentence and beam's factor over greedy; with ``need_validation`` also
        the seconds of a validation (a pass of the valid loss, and greedy BLEU's decoding at the
        probe's speed). With a test split to decode (``nmt-ls run``), CTranslate2 is timed too
        where it can run (:func:`scoring.probe_translators`) and the faster engine at beam search
        is chosen for it. The main worker's; the others return theirs."""
        b, e, plan = self.built, self.built.cfg.eval, self.planner.state
        src = b.valid.bleu_src[:DECODE_PROBE_SENTENCES]
        if not (b.world.is_main and src):
            return Probe(plan.greedy_s, plan.beam_ratio, 0.0, plan.test_engine, plan.probe_s)
        translators = {"torch": partial(translate, b.model, b.tok)}
        if self.planner.budget.test_sentences:
            translators = scoring.probe_translators(b.model, b.tok, to_dict(b.cfg.model), b.world.device)
        probe_s = scoring.time_engines(translators, src, e, self.clock)
        translators.clear()  # CTranslate2's threads end here, not in a garbage collection (see cmd_run)
        greedy_s, beam_s = probe_s["torch"]["greedy"], probe_s["torch"]["beam"]
        validation_s = 0.0
        if need_validation:
            start = self.clock()
            self.validation_outputs()
            validation_s = self.clock() - start + greedy_s * len(b.valid.bleu_src)
        test_engine = scoring.faster_engine(probe_s) if self.planner.budget.test_sentences else ""
        return Probe(greedy_s, beam_s / max(greedy_s, 1e-9), validation_s, test_engine, probe_s)

    def summarize(self, reason: str) -> dict:
        b, s, plan, out = self.built, self.state, self.planner.state, self.built.out_dir
        t = b.cfg.train
        summary = {
            "updates": s.update,
            "planned_updates": plan.planned_updates,
            "epochs": s.epoch,
            "best": s.best,
            "best_metric": t.best_metric,
            "minutes": plan.elapsed / 60,
            "stop_reason": reason,
            "final_lr": b.optimizer.param_groups[0]["lr"],
            "log": str(out / "train_log.jsonl"),
            "checkpoint_best": str(out / "checkpoint_best.pt"),
            "checkpoint_last": str(out / "checkpoint_last.pt"),
            "params": sum(q.numel() for q in b.model.parameters()),
        }
        if b.test_pairs:  # for scoring (`nmt-ls run` pops them; summary.json's "test" holds the engine)
            summary.update(test_pairs=b.test_pairs, test_engine=plan.test_engine, probe_s=plan.probe_s)
        if b.world.is_main:
            log.info(
                "training done (%s): %d updates, %.1f minutes, lr now %.3g, best %s %s",
                reason,
                s.update,
                summary["minutes"],
                summary["final_lr"],
                t.best_metric,
                s.best,
            )
        return summary


def sum_outputs(outputs: list[dict], world) -> dict:
    """Logging outputs summed over samples, then over workers in one collective."""
    keys = list(dict.fromkeys(k for o in outputs for k in o))
    sums = [sum(float(o.get(k, 0)) for o in outputs) for k in keys]
    return dict(zip(keys, world.all_reduce_sum(sums)))
