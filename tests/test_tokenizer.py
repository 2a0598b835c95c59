from pathlib import Path

import pytest
import sentencepiece as spm
import torch

from nmt_ls.data import Corpus, read_pairs
from nmt_ls.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, train_spm

FIXTURE = Path(__file__).parent / "data" / "lohelp_en_de"
VOCAB = 1000


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    """Joint model trained on the fixture's train split only."""
    out = tmp_path_factory.mktemp("spm")
    model = train_spm([FIXTURE / "train.en", FIXTURE / "train.de"], out / "joint", VOCAB)
    return Tokenizer(model)


def test_special_ids_are_fixed(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert PAD_ID == 0 == tok.pad_id  # the criterion's ignore index
    assert (UNK_ID, BOS_ID, EOS_ID) == (1, 2, 3)
    assert tok.vocab_size == len(tok) == VOCAB


def test_round_trip_on_held_out_test_lines(tok):
    src, tgt = read_pairs(Corpus(FIXTURE, "en", "de"), "test")
    for line in src + tgt:
        assert tok.decode(tok.encode(line)) == line
    assert tok.decode_batch(tok.encode_batch(src)) == src


def test_round_trip_of_unseen_characters(tok):
    for text in ["Grüße aus Köln — 漢字 ☃ 🙂", "a  b", "tab\there", "x"]:
        assert tok.decode(tok.encode(text)) == text


def test_encode_has_no_bos_eos_and_decode_strips_specials(tok):
    ids = tok.encode("Select the text that you want to underline.")
    assert BOS_ID not in ids and EOS_ID not in ids and PAD_ID not in ids
    text = tok.decode(ids)
    assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == text
    assert tok.decode([*ids, EOS_ID, *tok.encode("garbage after eos")]) == text  # stops at eos
    batch = torch.tensor([[BOS_ID, *ids, EOS_ID], [BOS_ID, *ids[:2], EOS_ID] + [PAD_ID] * (len(ids) - 2)])
    assert tok.decode_batch(batch)[0] == text


def test_training_is_deterministic(tmp_path):
    src, tgt = read_pairs(Corpus(FIXTURE, "en", "de"), "valid")

    def pieces(path):
        sp = spm.SentencePieceProcessor(model_file=str(path))
        return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]

    a = train_spm(iter(src + tgt), tmp_path / "a", 500)
    b = train_spm(iter(src + tgt), tmp_path / "b", 500)
    assert pieces(a) == pieces(b)


def test_bpe_model(tmp_path):
    src, tgt = read_pairs(Corpus(FIXTURE, "en", "de"), "valid")
    tok = Tokenizer(train_spm(iter(src + tgt), tmp_path / "bpe", 500, model_type="bpe"))
    assert tok.pad_id == PAD_ID
    assert all(tok.decode(tok.encode(t)) == t for t in tgt)


def test_vocab_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size=5000 is too large .* at most \d+"):
        train_spm(iter(["a small corpus", "of two lines"] * 5), tmp_path / "m", 5000)


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_spm(tmp_path / "missing.txt", tmp_path / "m", 100)
    with pytest.raises(ValueError, match="model_type"):
        train_spm(iter(["x"]), tmp_path / "m", 100, model_type="word-ish")
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer(tmp_path / "nope.model")


def test_foreign_model_with_other_special_ids_is_rejected(tmp_path):
    src, _ = read_pairs(Corpus(FIXTURE, "en", "de"), "valid")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(src), model_prefix=str(tmp_path / "foreign"), vocab_size=300, minloglevel=2
    )  # sentencepiece defaults: unk=0, bos=1, eos=2, no pad
    with pytest.raises(ValueError, match="special ids"):
        Tokenizer(tmp_path / "foreign.model")


def test_tokenizer_is_retrained_when_the_train_files_change(tmp_path, caplog):
    """Issue 20 row 5: spm.model was keyed on the data settings only, and kept after the train
    files were replaced (while the binarized cache was rebuilt)."""
    import logging
    import shutil

    from nmt_ls.build import load_tokenizer
    from nmt_ls.config import load_recipe
    from nmt_ls.data import open_corpus
    from nmt_ls.distributed import World

    from conftest import SMOKE_RECIPE, overrides

    corpus = Path(shutil.copytree(FIXTURE, tmp_path / "corpus"))
    cfg = load_recipe(SMOKE_RECIPE, overrides(tmp_path / "run", f"data.dir={str(corpus)!r}"))
    world = World(0, 1, torch.device("cpu"))
    before = load_tokenizer(cfg, world, None, open_corpus(cfg.data))  # each call a run, each run its corpus
    kept = (tmp_path / "run" / "spm.model").read_bytes()
    assert load_tokenizer(cfg, world, None, open_corpus(cfg.data)).sp.serialized_model_proto() == kept  # kept
    for lang in ("en", "de"):
        path = corpus / f"train.{lang}"
        path.write_text(path.read_text(encoding="utf-8").upper(), encoding="utf-8")
    with caplog.at_level(logging.INFO, logger="nmt_ls.build"):
        after = load_tokenizer(cfg, world, None, open_corpus(cfg.data))
    assert "spm.model: its train_files changed since it was trained" in caplog.text
    assert (tmp_path / "run" / "spm.model").read_bytes() != kept
    line = read_pairs(Corpus(corpus, "en", "de"))[0][0]
    assert len(after.encode(line)) < len(before.encode(line)) / 2  # fitted to the new text


def test_resume_on_edited_train_files_keeps_spm_json_describing_the_model_on_disk(tmp_path, caplog):
    """Issue 29 row 6: ``--resume`` wrote the checkpoint's (old) model and the new files' spm.json,
    so a later fresh run kept the stale model (an upper-cased test line: 68 pieces, not 28)."""
    import logging
    import shutil

    from nmt_ls import checkpoint
    from nmt_ls.build import load_tokenizer
    from nmt_ls.config import load_recipe
    from nmt_ls.data import open_corpus
    from nmt_ls.distributed import World

    from conftest import SMOKE_RECIPE, overrides

    corpus = Path(shutil.copytree(FIXTURE, tmp_path / "corpus"))
    cfg = load_recipe(SMOKE_RECIPE, overrides(tmp_path / "run", f"data.dir={str(corpus)!r}"))
    world, spm_path = World(0, 1, torch.device("cpu")), tmp_path / "run" / "spm.model"
    before = load_tokenizer(cfg, world, None, open_corpus(cfg.data))
    ckpt = {"spm": checkpoint.spm_to_tensor(spm_path)}  # what a checkpoint of that run holds
    for lang in ("en", "de"):
        path = corpus / f"train.{lang}"
        path.write_text(path.read_text(encoding="utf-8").upper(), encoding="utf-8")
    resumed = load_tokenizer(cfg, world, ckpt, open_corpus(cfg.data))  # --resume: the checkpoint's model
    assert resumed.sp.serialized_model_proto() == before.sp.serialized_model_proto()
    with caplog.at_level(logging.INFO, logger="nmt_ls.build"):
        fresh = load_tokenizer(cfg, world, None, open_corpus(cfg.data))  # a later run without --resume
    assert "spm.model: its train_files changed since it was trained" in caplog.text
    line = read_pairs(Corpus(corpus, "en", "de"), "test")[0][0].upper()
    assert len(fresh.encode(line)) < len(before.encode(line)) / 2  # fitted to the upper-cased text
