"""The fairseq plugin against fairseq 0.12's own label_smoothed_cross_entropy: one forward on
fixed logits, one tiny transformer on binarized data, and two `fairseq-train` runs."""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fairseq")

from fairseq import options, tasks
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    label_smoothed_nll_loss,
)
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.logging import metrics
from fairseq.models import BaseFairseqModel, FairseqDecoder
from test_criterion import dense_loss, random_batch

from nmt_ls.criterions.functional import SMOOTHINGS, smoothed_target_entropy
from nmt_ls.fairseq_plugin import USER_DIR
from nmt_ls.fairseq_plugin.criterions import (
    NmtLsLabelSmoothedConfig,
    NmtLsLabelSmoothedCriterion,
    NmtLsLabelSmoothedKLCriterion,
)

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "lohelp_en_de"
PAD = Dictionary().pad()  # 1, as in every fairseq dictionary
TINY = (
    "--arch transformer --encoder-layers 1 --decoder-layers 1 --encoder-embed-dim 32 --decoder-embed-dim 32 "
    "--encoder-ffn-embed-dim 64 --decoder-ffn-embed-dim 64 --encoder-attention-heads 2 "
    "--decoder-attention-heads 2 --share-all-embeddings --cpu --seed 1 --max-tokens 1000 --num-workers 0"
).split()
TRAIN = (
    "--optimizer adam --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 2 --max-update 5 --no-save "
    "--log-format json --log-interval 1 --label-smoothing 0.1 --report-accuracy"
).split()


# ---- a fake model whose output is fixed logits -------------------------------------------


class LogitsDecoder(FairseqDecoder):
    """fairseq decoder returning the logits it holds; fairseq's own get_normalized_probs."""

    def __init__(self, logits):
        super().__init__(Dictionary())
        self.logits = torch.nn.Parameter(logits.clone())  # (B, T, V)

    def forward(self, prev_output_tokens, **kwargs):
        return self.logits, {"attn": [None]}


class LogitsModel(BaseFairseqModel):
    def __init__(self, logits):
        super().__init__()
        self.decoder = LogitsDecoder(logits)

    def forward(self, prev_output_tokens):
        return self.decoder(prev_output_tokens)


def run_criterion(criterion, logits, tgt, reduce=True):
    """(loss, sample_size, logging_output, grad of the logits) of one forward and backward."""
    model = LogitsModel(logits)
    sample = {"net_input": {"prev_output_tokens": tgt}, "target": tgt, "ntokens": int(tgt.ne(PAD).sum())}
    loss, sample_size, log = criterion(model, sample, reduce=reduce)
    loss.sum().backward()
    return loss, sample_size, log, model.decoder.logits.grad


TASK = SimpleNamespace(target_dictionary=Dictionary())


def criterion(cls=NmtLsLabelSmoothedCriterion, sentence_avg=False, label_smoothing=0.1, smoothing=None, **fields):
    """``cls(TASK, cfg)`` with these config fields, as fairseq builds it; ``smoothing`` None
    leaves the choice to the class's ``default_smoothing``."""
    fields.update(sentence_avg=sentence_avg, label_smoothing=label_smoothing, smoothing=smoothing)
    return cls(TASK, NmtLsLabelSmoothedConfig(**fields))


@pytest.mark.parametrize(
    "ignore_prefix_size,sentence_avg,fused", [(0, False, False), (1, True, False), (0, False, True), (2, True, True)]
)
def test_forward_matches_fairseq_criterion(ignore_prefix_size, sentence_avg, fused):
    logits, tgt = random_batch(0)  # (3, 5, 11), pad 1
    ours = criterion(
        sentence_avg=sentence_avg,
        smoothing="others",
        ignore_prefix_size=ignore_prefix_size,
        report_accuracy=True,
        fused=fused,
    )
    ref = LabelSmoothedCrossEntropyCriterion(TASK, sentence_avg, 0.1, ignore_prefix_size, True)
    loss, size, log, grad = run_criterion(ours, logits, tgt)
    ref_loss, ref_size, ref_log, ref_grad = run_criterion(ref, logits, tgt)
    # fairseq takes log_softmax in float32; the fused path keeps these logits in float64
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert log["nll_loss"].item() == pytest.approx(ref_log["nll_loss"].item(), rel=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
    assert size == ref_size == (3 if sentence_avg else int(tgt.ne(PAD).sum()))
    for key in ("ntokens", "nsentences", "sample_size", "n_correct", "total"):
        assert log[key] == ref_log[key], key


def test_unreduced_forward_matches_label_smoothed_nll_loss():
    logits, tgt = random_batch(1)
    ours = criterion(label_smoothing=0.2, smoothing="others", ignore_prefix_size=1)
    loss, _, log, _ = run_criterion(ours, logits, tgt, reduce=False)
    lprobs = logits[:, 1:].float().log_softmax(-1)  # what fairseq's get_normalized_probs gives
    ref_loss, ref_nll = label_smoothed_nll_loss(lprobs, tgt[:, 1:], 0.2, ignore_index=PAD, reduce=False)
    assert loss.shape == tgt[:, 1:].shape
    assert torch.allclose(loss.float(), ref_loss.squeeze(-1), rtol=1e-6, atol=1e-7)
    assert log["nll_loss"].item() == pytest.approx(ref_nll.sum().item(), rel=1e-6)


def reduced(criterion_cls, logging_outputs) -> dict:
    """The meters' unrounded averages and the derived values after ``reduce_metrics``."""
    with metrics.aggregate(new_root=True) as agg:
        criterion_cls.reduce_metrics(logging_outputs)
        values = {key: float(agg[key].avg) for key in ("loss", "nll_loss", "kl") if key in agg}
        values.update(ppl=agg.get_smoothed_value("ppl"), accuracy=agg.get_smoothed_value("accuracy"))
        return values


def test_reduce_metrics_are_fairseqs_base_2_metrics():
    batches = [random_batch(seed) for seed in (2, 3)]
    ours = criterion(report_accuracy=True)
    ref = LabelSmoothedCrossEntropyCriterion(TASK, False, 0.1, report_accuracy=True)
    ours_logs = [run_criterion(ours, *batch)[2] for batch in batches]
    ref_logs = [run_criterion(ref, *batch)[2] for batch in batches]
    got, want = reduced(type(ours), ours_logs), reduced(type(ref), ref_logs)
    ntokens = sum(log["ntokens"] for log in ref_logs)
    nll_nats = sum(log["nll_loss"].item() for log in ref_logs)
    assert got["nll_loss"] == pytest.approx(nll_nats / ntokens / math.log(2), rel=1e-6)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["nll_loss"] == pytest.approx(want["nll_loss"], rel=1e-6)
    assert got["ppl"] == want["ppl"] == round(2 ** want["nll_loss"], 2)
    assert got["accuracy"] == want["accuracy"]
    # kl = loss - H(q) per token, here where sample_size counts tokens; V = 11
    entropy_bits = smoothed_target_entropy(0.1, 11, "others") / math.log(2)
    assert got["kl"] == pytest.approx(got["loss"] - entropy_bits, rel=1e-6)


@pytest.mark.parametrize("kl_smoothing", SMOOTHINGS)
def test_smoothings_differ_and_kl_is_ce_minus_entropy(kl_smoothing):
    logits, tgt = random_batch(4)  # confident logits (scale 3), V = 11
    ntokens = int(tgt.ne(PAD).sum())
    losses = {s: run_criterion(criterion(smoothing=s), logits, tgt)[0].item() for s in SMOOTHINGS}
    assert all(math.isfinite(v) for v in losses.values())
    values = sorted(losses.values())  # float32 (fairseq's log_softmax): rounding ~1e-7 relative
    assert min(b - a for a, b in itertools.pairwise(values)) > 1e-5 * values[0]
    kl = run_criterion(criterion(NmtLsLabelSmoothedKLCriterion, smoothing=kl_smoothing), logits, tgt)[0].item()
    entropy = smoothed_target_entropy(0.1, 11, kl_smoothing)  # nats per token, closed form
    assert kl == pytest.approx(losses[kl_smoothing] - ntokens * entropy, rel=1e-6)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match=r"--label-smoothing must be in \[0, 1\), got 1.0"):
        criterion(label_smoothing=1.0)
    with pytest.raises(ValueError, match="--smoothing must be one of"):
        criterion(smoothing="gaussian")
    fused = criterion(fused=True)
    model = LogitsModel(random_batch(0)[0])
    model.decoder.adaptive_softmax = torch.nn.Identity()
    with pytest.raises(ValueError, match="--fused needs plain logits"):
        fused.scores_and_target(model, model(None), {"target": random_batch(0)[1]})


def test_user_dir_path_is_printed_by_the_module():
    out = subprocess.run([sys.executable, "-m", "nmt_ls.fairseq_plugin"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == USER_DIR
    assert Path(USER_DIR, "__init__.py").is_file()
    # fairseq leaves this folder on sys.path: nothing else in it may become importable
    assert set(os.listdir(Path(USER_DIR).parent)) - {"__pycache__"} == {"__init__.py", "nmt_ls_fairseq"}


# ---- a tiny fairseq transformer on binarized data -------------------------------------------


@pytest.fixture(scope="module")
def data_bin(tmp_path_factory):
    """200 train / 40 valid pairs of the fixture, binarized by fairseq-preprocess with a joined
    500-word dictionary."""
    from fairseq_cli import preprocess

    raw, out = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("bin")
    for split, n in (("train", 200), ("valid", 40)):
        for lang in ("en", "de"):
            lines = (FIXTURE / f"{split}.{lang}").read_text(encoding="utf-8").splitlines(keepends=True)
            (raw / f"{split}.{lang}").write_text("".join(lines[:n]), encoding="utf-8")
    argv = f"--source-lang en --target-lang de --trainpref {raw}/train --validpref {raw}/valid "
    argv += f"--destdir {out} --joined-dictionary --nwordssrc 500 --workers 1"
    preprocess.main(options.get_preprocessing_parser().parse_args(argv.split()))
    return out


def fairseq_setup(data_bin, *criterion_args):
    """(task, criterion, cfg) as fairseq-train builds them from the command line."""
    argv = [str(data_bin), *TINY, "--user-dir", USER_DIR, *criterion_args]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(cfg.task)
    return task, task.build_criterion(cfg.criterion), cfg


@pytest.fixture(scope="module")
def transformer_batch(data_bin):
    """A tiny transformer (eval mode, seed 1) and the first valid batch."""
    task, _, cfg = fairseq_setup(data_bin, "--criterion", "label_smoothed_cross_entropy")
    torch.manual_seed(1)
    model = task.build_model(cfg.model).eval()
    task.load_dataset("valid")
    batches = task.get_batch_iterator(task.dataset("valid"), max_tokens=1000).next_epoch_itr(shuffle=False)
    return model, next(iter(batches))


def test_smoothings_on_a_fairseq_transformer(data_bin, transformer_batch):
    """Each --smoothing is the dense-q cross-entropy of the model's log-probs; the KL criterion
    is that minus H(q) per non-pad token; --smoothing others is fairseq's own criterion. (The
    three are nearly equal here: an untrained model predicts almost uniformly, and CE(q, p) =
    log V for a uniform p whatever q is.)"""
    model, sample = transformer_batch
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True).double()
    tgt = sample["target"]  # (B, T), pad 1
    assert tgt.eq(PAD).any()
    builtin = fairseq_setup(data_bin, "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1")[1]
    with torch.no_grad():
        builtin_loss = builtin(model, sample)[0].item()
    for smoothing in SMOOTHINGS:
        args = ("--label-smoothing", "0.1", "--smoothing", smoothing)
        ce = fairseq_setup(data_bin, "--criterion", "nmt_ls_label_smoothed", *args)[1]
        kl = fairseq_setup(data_bin, "--criterion", "nmt_ls_label_smoothed_kl", *args)[1]
        assert (type(ce), type(kl), ce.smoothing, kl.smoothing) == (
            NmtLsLabelSmoothedCriterion,
            NmtLsLabelSmoothedKLCriterion,
            smoothing,
            smoothing,
        )
        with torch.no_grad():
            ce_loss, _, ce_log = ce(model, sample)
            kl_loss, _, kl_log = kl(model, sample)
        dense_ce, dense_kl, dense_nll = dense_loss(lprobs, tgt, 0.1, smoothing, PAD)
        assert math.isfinite(ce_loss.item())
        assert ce_loss.item() == pytest.approx(dense_ce.item(), rel=1e-6)
        assert kl_loss.item() == pytest.approx(dense_kl.item(), rel=1e-6)
        assert ce_log["nll_loss"].item() == kl_log["nll_loss"].item() == pytest.approx(dense_nll.item(), rel=1e-6)
        assert kl_log["kl"].item() == kl_loss.item() == pytest.approx(ce_log["kl"].item(), rel=1e-6)
        if smoothing == "others":
            assert ce_loss.item() == pytest.approx(builtin_loss, rel=1e-6)


def test_fused_forward_equals_get_normalized_probs_path(data_bin, transformer_batch):
    model, sample = transformer_batch
    args = ("--criterion", "nmt_ls_label_smoothed", "--label-smoothing", "0.1", "--smoothing", "others_no_pad")
    plain, fused = (fairseq_setup(data_bin, *args, *extra)[1] for extra in ((), ("--fused",)))
    assert (plain.fused, fused.fused) == (False, True)
    results = []
    for criterion in (plain, fused):
        model.zero_grad()
        loss, _, log = criterion(model, sample)
        loss.backward()
        results.append((loss.item(), log["nll_loss"].item(), model.decoder.embed_tokens.weight.grad.clone()))
    (loss, nll, grad), (fused_loss, fused_nll, fused_grad) = results
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert fused_nll == pytest.approx(nll, rel=1e-6)
    assert torch.allclose(fused_grad, grad, rtol=1e-4, atol=1e-6)


def test_kl_criterion_defaults_to_others_no_pad(data_bin):
    assert fairseq_setup(data_bin, "--criterion", "nmt_ls_label_smoothed_kl")[1].smoothing == "others_no_pad"
    assert fairseq_setup(data_bin, "--criterion", "nmt_ls_label_smoothed")[1].smoothing == "others"
    assert criterion(NmtLsLabelSmoothedKLCriterion).smoothing == "others_no_pad"
    assert criterion().smoothing == "others"


# ---- two fairseq-train runs -----------------------------------------------------------------


def train_records(returncode: int, out: str) -> list[dict]:
    """The json records in a fairseq-train's output: train_inner per update, then valid."""
    assert returncode == 0, out[-3000:]
    return [
        json.loads(line.split(" | ", 3)[3])
        for line in out.splitlines()
        if " | train_inner | " in line or " | valid | " in line
    ]


def start_train(data_bin, tmp_path, name, *criterion_args):
    save_dir = tmp_path / name
    argv = [sys.executable, "-m", "fairseq_cli.train", str(data_bin), *TINY, *TRAIN, "--save-dir", str(save_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*argv, *criterion_args], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


# The columns, with the unit fairseq rounds them to when it prints them.
PRINTED_UNITS = {"loss": 1e-3, "nll_loss": 1e-3, "ppl": 1e-2, "accuracy": 1e-3, "gnorm": 1e-3}


def test_fairseq_train_plugin_logs_what_the_builtin_logs(data_bin, tmp_path):
    """Same seed, same data: per update, the plugin's loss, nll_loss, ppl, accuracy and gradient
    norm equal those of fairseq's label_smoothed_cross_entropy to the digits fairseq prints."""
    runs = [  # started together: most of each run is importing fairseq
        start_train(
            data_bin,
            tmp_path,
            "plugin",
            "--user-dir",
            USER_DIR,
            "--criterion",
            "nmt_ls_label_smoothed",
            "--smoothing",
            "others",
        ),
        start_train(data_bin, tmp_path, "builtin", "--criterion", "label_smoothed_cross_entropy"),
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in runs]
    plugin, builtin = (train_records(proc.returncode, out) for proc, out in zip(runs, outputs))
    assert [r.get("num_updates") for r in plugin[:5]] == ["1", "2", "3", "4", "5"]
    assert len(plugin) == len(builtin) == 6 and "valid_loss" in plugin[5]
    for ours, ref in zip(plugin, builtin):
        prefix = "valid_" if "valid_loss" in ref else ""
        for key, unit in PRINTED_UNITS.items():
            if prefix + key in ref:
                got, want = float(ours[prefix + key]), float(ref[prefix + key])
                assert abs(got - want) <= unit * 1.001, (prefix + key, ours, ref)
        assert "kl" in ours or "valid_kl" in ours
