"""tools/bench_train.py's fairseq row: the data-bin holds our pairs, fairseq's collater gives our
batches, its transformer has our model's parameters and its lr schedule our warmup's lrs."""

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("fairseq")

from fairseq import options, tasks
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.optim import build_optimizer
from fairseq.optim.lr_scheduler import build_lr_scheduler

from nmt_ls.batching import batch_by_tokens
from nmt_ls.binarize import EncodedPairs
from nmt_ls.build import build_schedule
from nmt_ls.config import load_recipe
from nmt_ls.model import build_model
from nmt_ls.tokenizer import BOS_ID, EOS_ID, PAD_ID

from conftest import ROOT, SMOKE_RECIPE, overrides

VOCAB_SIZE = 40
FROM_FAIRSEQ = {0: BOS_ID, 1: PAD_ID, 2: EOS_ID, 3: 1}  # fairseq's bos, pad, eos, unk -> ours


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "tools" / "bench_train.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def random_pairs(n: int) -> EncodedPairs:
    """``n`` pairs of 1-9 ids in [1, VOCAB_SIZE) (unk included, no pad, bos or eos), the source
    ending in eos, as the binarized train split holds them."""
    rng = np.random.default_rng(0)
    ids = lambda: [int(i) if i > EOS_ID else 1 for i in rng.integers(1, VOCAB_SIZE, rng.integers(1, 10))]  # noqa: E731
    return EncodedPairs([ids() + [EOS_ID] for _ in range(n)], [ids() for _ in range(n)])


def fairseq_task(tool, tmp_path, *extra: str):
    """(the recipe, fairseq's cfg, its task with the train split of ``tmp_path/bin`` loaded)."""
    cfg = load_recipe(SMOKE_RECIPE, overrides(tmp_path / "run", *extra))
    argv = tool.fairseq_argv(cfg, str(tmp_path / "bin"), str(tmp_path / "save"))
    fs_cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    task = tasks.setup_task(fs_cfg.task)
    task.load_dataset("train")
    return cfg, fs_cfg, task


def ours(ids: torch.Tensor) -> torch.Tensor:
    """fairseq ids back to ours."""
    return ids.clone().apply_(lambda i: FROM_FAIRSEQ.get(i, i))


@pytest.fixture
def tool_and_pairs(tmp_path):
    tool, pairs = load_tool(), random_pairs(50)
    tool.write_fairseq_bin(pairs, VOCAB_SIZE, tmp_path / "bin")
    return tool, pairs


def test_fairseq_collates_our_batches(tool_and_pairs, tmp_path):
    tool, pairs = tool_and_pairs
    data = fairseq_task(tool, tmp_path)[2].dataset("train")
    assert len(data) == 50 and len(data.src_dict) == VOCAB_SIZE
    order = batch_by_tokens(data.src_sizes, data.tgt_sizes - 1, 30, seed=1)
    expected = batch_by_tokens(pairs.src_lens, pairs.tgt_lens, 30, seed=1)
    assert [list(b) for b in order] == [list(b) for b in expected] and len(order) > 5
    for idx in order:
        batch = pairs.batch(idx, PAD_ID, BOS_ID, EOS_ID)
        sample = data.collater([data[i] for i in idx])  # rows sorted by source length, left-padded source
        rows = [list(idx).index(i) for i in sample["id"].tolist()]
        assert sample["ntokens"] == batch.ntokens
        assert sample["net_input"]["src_tokens"].shape == batch.src.shape
        assert torch.equal(ours(sample["target"]), batch.tgt_out[rows])
        assert torch.equal(ours(sample["net_input"]["prev_output_tokens"][:, 1:]), batch.tgt_in[rows, 1:])
        for src, row in zip(ours(sample["net_input"]["src_tokens"]), rows):
            assert torch.equal(src[src.ne(PAD_ID)], batch.src[row][batch.src[row].ne(PAD_ID)])


def test_fairseq_transformer_has_our_parameters(tool_and_pairs, tmp_path):
    tool = tool_and_pairs[0]
    extra = ("model.enc_layers=2", "model.dec_layers=1", "model.dropout=0.3", "model.attn_dropout=0.1")
    cfg, fs_cfg, task = fairseq_task(tool, tmp_path, *extra)
    fs_model = task.build_model(fs_cfg.model)
    model = build_model(VOCAB_SIZE, PAD_ID, **dataclasses.asdict(cfg.model))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (
        count(fs_model) == count(model) == 120_000
    )  # 2,560 embedding, 2 x 33,472 encoder, 50,240 decoder, 256 final norms
    enc, dec = fs_model.encoder, fs_model.decoder
    assert (len(enc.layers), len(dec.layers)) == (2, 1)
    assert dec.output_projection.weight is dec.embed_tokens.weight is enc.embed_tokens.weight
    assert enc.layers[0].normalize_before and dec.layers[0].normalize_before and enc.layer_norm is not None
    assert (enc.dropout_module.p, enc.layers[0].self_attn.dropout_module.p) == (0.3, 0.1)
    assert type(enc.embed_positions).__name__ == "SinusoidalPositionalEmbedding"


def test_fairseq_fixed_schedule_has_the_lrs_of_wsd_until_the_cooldown(tool_and_pairs, tmp_path):
    tool = tool_and_pairs[0]
    extra = ("train.lr_scheduler='wsd'", "train.max_updates=40", "train.warmup_steps=20")
    cfg, fs_cfg, _ = fairseq_task(tool, tmp_path, *extra)
    param = torch.nn.Parameter(torch.zeros(1))
    fs_optimizer = build_optimizer(fs_cfg.optimizer, [param])
    fs_schedule = build_lr_scheduler(fs_cfg.lr_scheduler, fs_optimizer)
    schedule = build_schedule(cfg, torch.optim.AdamW([param], lr=cfg.train.lr))
    for update in range(32):  # the cooldown is the last 20% of 40
        assert fs_schedule.step_update(update) == pytest.approx(schedule.get_last_lr()[0], rel=1e-12), update
        schedule.step()
    assert fs_optimizer.get_lr() == cfg.train.lr == 0.002
    assert fs_optimizer.optimizer.defaults["betas"] == cfg.train.betas
