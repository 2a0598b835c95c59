"""nmt_ls.hf: the label-smoothed loss inside a Hugging Face Seq2SeqTrainer, on a tiny Marian model."""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it
from transformers import (  # noqa: E402
    MarianConfig,
    MarianMTModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    TrainerCallback,
)

from nmt_ls.hf import LabelSmoothedLoss, NllLoggingCallback  # noqa: E402

VOCAB, PAD, EOS = 96, 0, 1


def tiny_marian(dtype=torch.float32) -> MarianMTModel:
    torch.manual_seed(0)
    cfg = MarianConfig(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
        forced_eos_token_id=EOS,
    )
    return MarianMTModel(cfg).to(dtype)


def examples(n: int, seed: int = 1) -> list[dict]:
    """A reversal task, source lengths 2..13 so that the micro-batches' token counts differ."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        src = torch.randint(2, VOCAB, (2 + (5 * i) % 12,), generator=g).tolist()
        out.append({"input_ids": src + [EOS], "labels": src[::-1] + [EOS]})
    return out


class Collator:
    """Pads sources with PAD and labels with -100, and builds the decoder inputs the model needs
    (the Trainer pops ``labels`` before the forward pass)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, rows: list[dict]) -> dict:
        def pad(seqs, value):
            n = max(map(len, seqs))
            return torch.tensor([s + [value] * (n - len(s)) for s in seqs])

        src = pad([r["input_ids"] for r in rows], PAD)  # (B, S)
        labels = pad([r["labels"] for r in rows], -100)  # (B, T)
        return {
            "input_ids": src,
            "attention_mask": src.ne(PAD).long(),
            "labels": labels,
            "decoder_input_ids": self.model.prepare_decoder_input_ids_from_labels(labels=labels),
        }


def batch_logits(model, rows):
    batch = Collator(model)(rows)
    labels = batch.pop("labels")
    return model(**batch), labels


def dense_reference(logits, labels, eps, smoothing):
    """Loss summed over kept tokens from an explicit float64 target q (N, V)."""
    lp = logits.double().log_softmax(-1).reshape(-1, VOCAB)  # (N, V)
    tgt = labels.reshape(-1)
    keep = tgt.ne(-100)
    lp, tgt = lp[keep], tgt[keep]
    if smoothing == "uniform":
        q = torch.full_like(lp, eps / VOCAB)
        q[torch.arange(len(tgt)), tgt] += 1 - eps
    else:
        others = VOCAB - 1 if smoothing == "others" else VOCAB - 2
        q = torch.full_like(lp, eps / others)
        if smoothing == "others_no_pad":
            q[:, PAD] = 0.0
        q[torch.arange(len(tgt)), tgt] = 1 - eps
    return -(q * lp).sum()


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("smoothing", ["uniform", "others", "others_no_pad"])
def test_loss_equals_dense_reference_over_num_items(smoothing, fused):
    model = tiny_marian(torch.float64)
    outputs, labels = batch_logits(model, examples(5))
    loss_fn = LabelSmoothedLoss(0.1, smoothing, pad_id=PAD, fused=fused)
    ref = dense_reference(outputs.logits, labels, 0.1, smoothing)
    n = int(labels.ne(-100).sum())
    torch.testing.assert_close(loss_fn(outputs, labels, num_items_in_batch=torch.tensor(3 * n)), ref / (3 * n))
    torch.testing.assert_close(loss_fn(outputs, labels), ref / n)  # None: this batch's tokens
    nll_sum, ntokens = loss_fn.pop_nll("train")
    nll_ref = F.cross_entropy(outputs.logits.reshape(-1, VOCAB), labels.reshape(-1), reduction="sum")
    assert ntokens == 2 * n and nll_sum == pytest.approx(2 * nll_ref.item(), rel=1e-12)


def test_uniform_equals_torch_label_smoothing():
    model = tiny_marian()
    outputs, labels = batch_logits(model, examples(6))
    expected = F.cross_entropy(
        outputs.logits.reshape(-1, VOCAB), labels.reshape(-1), label_smoothing=0.2, ignore_index=-100
    )
    for fused in (False, True):
        torch.testing.assert_close(LabelSmoothedLoss(0.2, "uniform", fused=fused)(outputs, labels), expected)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="needs pad_id"):
        LabelSmoothedLoss(0.1, "others_no_pad")
    with pytest.raises(ValueError, match="smoothing must be one of"):
        LabelSmoothedLoss(0.1, "label")
    outputs = {"logits": torch.zeros(1, 2, VOCAB)}
    with pytest.raises(ValueError, match="labels hold pad_id 0"):
        LabelSmoothedLoss(0.1, "others_no_pad", pad_id=PAD)(outputs, torch.tensor([[5, PAD]]))


def training_args(tmp_path, **kw) -> Seq2SeqTrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
        lr_scheduler_type="constant",
        weight_decay=0.0,
    )
    return Seq2SeqTrainingArguments(**{**base, **kw})


def test_trainer_steps_log_nll_and_ppl(tmp_path):
    model = tiny_marian()
    loss_fn = LabelSmoothedLoss(0.1, "others_no_pad", pad_id=PAD)
    args = training_args(
        tmp_path,
        max_steps=12,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=3e-3,
        logging_steps=4,
        eval_strategy="steps",
        eval_steps=12,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=examples(16),
        eval_dataset=examples(8, seed=2),
        data_collator=Collator(model),
        compute_loss_func=loss_fn,
        callbacks=[NllLoggingCallback(loss_fn)],
    )
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(train_logs) == 3
    for h in train_logs:
        assert math.isfinite(h["loss"]) and h["ppl"] == pytest.approx(math.exp(h["nll_loss"]), rel=1e-12)
        assert h["nll_loss"] < h["loss"]  # the smoothed loss adds eps * (smoothing term > nll) on a poor model
    assert train_logs[-1]["loss"] < train_logs[0]["loss"]
    (ev,) = [h for h in trainer.state.log_history if "eval_loss" in h]
    with torch.no_grad():  # the eval set is one batch of 8: recompute its NLL and loss per token
        outputs, labels = batch_logits(model.eval(), examples(8, seed=2))
        nll = F.cross_entropy(outputs.logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
        smoothed = dense_reference(outputs.logits, labels, 0.1, "others_no_pad") / labels.ne(-100).sum()
    assert ev["eval_nll_loss"] == pytest.approx(nll.item(), rel=1e-6)
    assert ev["eval_ppl"] == pytest.approx(math.exp(nll.item()), rel=1e-6)
    assert ev["eval_loss"] == pytest.approx(smoothed.item(), rel=1e-6)


def test_epsilon_zero_logs_nll_equal_to_loss(tmp_path):
    model = tiny_marian()
    loss_fn = LabelSmoothedLoss(0.0, "others")
    args = training_args(tmp_path, max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, logging_steps=1)
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=examples(12),
        data_collator=Collator(model),
        compute_loss_func=loss_fn,
        callbacks=[NllLoggingCallback(loss_fn)],
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:  # one step per log: the per-token NLL of that step is the logged loss
        assert h["nll_loss"] == pytest.approx(h["loss"], rel=1e-6)


class GradCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def accumulated_grads(tmp_path, batch_size: int, accumulation: int, loss_fn) -> dict:
    model = tiny_marian(torch.float64)
    capture = GradCapture()
    args = training_args(
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1.0,
        optim="sgd",
        max_grad_norm=0.0,
    )
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=examples(8),
        data_collator=Collator(model),
        compute_loss_func=loss_fn,
        callbacks=[capture],
    )
    trainer.train()
    return capture.grads


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    loss_fn = LabelSmoothedLoss(0.1, "others")
    big = accumulated_grads(tmp_path, 8, 1, loss_fn)
    accumulated = accumulated_grads(tmp_path, 2, 4, loss_fn)
    assert len(big) > 20 and max(g.abs().max().item() for g in big.values()) > 1e-2
    assert max_abs_diff(big, accumulated) < 1e-6

    def per_micro_batch_mean(outputs, labels, num_items_in_batch=None):  # the naive path
        return loss_fn(outputs, labels) / 4

    naive = accumulated_grads(tmp_path, 2, 4, per_micro_batch_mean)
    assert max_abs_diff(big, naive) > 1e-3
