"""nmt_ls's label-smoothed cross-entropy as a Hugging Face ``Trainer`` loss.

    >>> loss_fn = LabelSmoothedLoss(epsilon=0.1, smoothing="others")
    >>> trainer = Seq2SeqTrainer(model, args, train_dataset=..., data_collator=collator,
    ...                          compute_loss_func=loss_fn, callbacks=[NllLoggingCallback(loss_fn)])

``Trainer`` calls ``loss_fn(outputs, labels, num_items_in_batch=n)`` with the model's outputs
(computed without labels: the Trainer pops them first), the labels (B, T) padded with -100, and
``n``, the number of non-(-100) labels in the whole accumulated batch (all micro-batches of one
optimizer step, all devices). The loss is the summed smoothed loss over ``n``: the micro-batch
gradients then add up to the gradient of the big batch, whatever the token count of each.

Because the labels are popped, the model sees no labels and cannot build its decoder inputs:
the collator must give ``decoder_input_ids`` (``DataCollatorForSeq2Seq(tokenizer, model=model)``
does). This loss is for encoder-decoder models, whose logits at position t predict label t;
it does not shift labels as a causal LM needs.

The smoothed loss is not a log-likelihood; perplexity comes from the NLL. The callable keeps
the NLL and token sums of the steps since the last log (training and evaluation apart), and
:class:`NllLoggingCallback` adds ``nll_loss`` and ``ppl = exp(nll_loss)`` next to ``loss``
(``eval_nll_loss``, ``eval_ppl`` next to ``eval_loss``). The sums are those of this process.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor
from transformers import TrainerCallback

from nmt_ls.criterions.functional import SMOOTHINGS, LossOutput, LossSpec, label_smoothed_cross_entropy
from nmt_ls.criterions.fused import fused_label_smoothed_cross_entropy

IGNORE_INDEX = -100  # what Hugging Face collators and Trainer's token count use


class LabelSmoothedLoss:
    """Label-smoothed cross-entropy over labels padded with -100, for ``compute_loss_func``.

    Args:
        epsilon (float): smoothing mass in [0, 1). Default: 0.1
        smoothing (str): ``uniform`` (as ``F.cross_entropy(label_smoothing=...)`` and
            ``TrainingArguments.label_smoothing_factor``), ``others`` (fairseq) or
            ``others_no_pad`` (OpenNMT-py; puts no mass on the pad column). Default: ``others``
        pad_id (int, optional): the model's pad token id (``config.pad_token_id``); needed by
            ``others_no_pad`` only, and independent of the -100 mask. Default: None
        fused (bool): use :func:`~nmt_ls.criterions.fused.fused_label_smoothed_cross_entropy`
            (no (N, V) temporaries; same value and gradient) instead of the reference
            :func:`~nmt_ls.criterions.functional.label_smoothed_cross_entropy`. Default: True
    """

    def __init__(self, epsilon: float = 0.1, smoothing: str = "others", pad_id: int | None = None, fused: bool = True):
        if smoothing not in SMOOTHINGS:
            raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")
        if smoothing == "others_no_pad" and pad_id is None:
            raise ValueError("smoothing='others_no_pad' needs pad_id, the model's pad token id")
        self.epsilon, self.smoothing, self.pad_id, self.fused = epsilon, smoothing, pad_id, fused
        self._sums = {"train": None, "eval": None}  # split -> (nll_sum, ntokens), tensors

    def criterion(self, logits: Tensor, labels: Tensor) -> LossOutput:
        """Summed loss, KL and NLL of ``logits`` (B, T, V) against ``labels`` (B, T), -100 ignored."""
        ignore_index = IGNORE_INDEX
        if self.smoothing == "others_no_pad":
            # the reference zeroes the column ignore_index, so -100 becomes the pad id
            if labels.eq(self.pad_id).any():
                raise ValueError(
                    f"labels hold pad_id {self.pad_id} at a position not masked with -100; "
                    "others_no_pad cannot smooth towards pad (mask padding with -100)"
                )
            labels, ignore_index = labels.masked_fill(labels.eq(IGNORE_INDEX), self.pad_id), self.pad_id
        fn = fused_label_smoothed_cross_entropy if self.fused else label_smoothed_cross_entropy
        return fn(logits, labels, LossSpec(self.epsilon, ignore_index, self.smoothing, "sum"))

    def __call__(self, outputs, labels: Tensor, num_items_in_batch: Tensor | int | None = None) -> Tensor:
        """The smoothed loss per token of the accumulated batch.

        Args:
            outputs: the model's output (``ModelOutput``, dict or tuple) holding ``logits`` (B, T, V).
            labels (Tensor): gold ids (B, T), -100 at positions to ignore.
            num_items_in_batch (Tensor or int, optional): non-ignored labels in the accumulated
                batch; None divides by this batch's own count.
        Returns:
            Tensor: a scalar, the summed smoothed loss over ``num_items_in_batch``.
        """
        if labels is None:
            raise ValueError("LabelSmoothedLoss needs labels; the batch has none")
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]  # (B, T, V)
        out = self.criterion(logits, labels)
        ntokens = labels.ne(IGNORE_INDEX).sum()
        self._add("train" if torch.is_grad_enabled() else "eval", out.nll.detach(), ntokens)
        if num_items_in_batch is None:
            return out.loss / ntokens.clamp(min=1)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(out.loss.device)
        return out.loss / num_items_in_batch

    def _add(self, split: str, nll_sum: Tensor, ntokens: Tensor) -> None:
        prev = self._sums[split]
        self._sums[split] = (nll_sum, ntokens) if prev is None else (prev[0] + nll_sum, prev[1] + ntokens)

    def pop_nll(self, split: str = "train") -> tuple[float, int] | None:
        """``(nll_sum, ntokens)`` of the ``train`` (grad enabled) or ``eval`` calls since the
        last pop, or None if there were none; the sums restart from zero."""
        sums, self._sums[split] = self._sums[split], None
        if sums is None:
            return None
        return sums[0].item(), int(sums[1].item())


def nll_metrics(nll_sum: float, ntokens: int, prefix: str = "") -> dict[str, float]:
    """``{prefix}nll_loss`` (NLL per token, nats) and ``{prefix}ppl`` = exp of it."""
    nll_per_token = nll_sum / max(ntokens, 1)
    return {f"{prefix}nll_loss": nll_per_token, f"{prefix}ppl": math.exp(nll_per_token)}


class NllLoggingCallback(TrainerCallback):
    """Adds ``nll_loss``/``ppl`` to each training log and ``eval_nll_loss``/``eval_ppl`` to each
    evaluation log, from the sums a :class:`LabelSmoothedLoss` kept since the previous log.

    The values go into the ``logs`` dict that later callbacks see (the console printer,
    which Trainer adds last) and into ``state.log_history``. Reporting integrations
    (TensorBoard, W&B) run before callbacks given to ``Trainer(callbacks=...)``; to reach them,
    put this one first: ``trainer.callback_handler.callbacks.insert(0, cb)``.

    Args:
        loss_fn (LabelSmoothedLoss): the ``compute_loss_func`` given to the Trainer.
    """

    def __init__(self, loss_fn: LabelSmoothedLoss):
        self.loss_fn = loss_fn

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        eval_loss = [k for k in logs if k.startswith("eval") and k.endswith("_loss")]
        if "loss" in logs:
            split, prefix = "train", ""
        elif eval_loss:
            split, prefix = "eval", eval_loss[0][: -len("loss")]
        else:
            return
        sums = self.loss_fn.pop_nll(split)
        if sums is None:
            return
        metrics = nll_metrics(*sums, prefix=prefix)
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
