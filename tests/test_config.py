"""Recipes load; bad recipes and overrides name the key."""

from pathlib import Path

import pytest

from nmt_ls.config import ConfigError, RunConfig, load_recipe, to_dict

ROOT = Path(__file__).parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"
LADDER = "sizes:\n  small:\n    min_updates: 0\n    set:\n"  # a size's set follows, indented 6
RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"lohelp_en_de", "smoke"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_opens_with_its_command(path):
    cfg = load_recipe(path)
    assert isinstance(cfg, RunConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "nmt-ls" in "\n".join(path.read_text().splitlines()[:4])
    assert cfg.criterion.name in ("label_smoothed_cross_entropy", "label_smoothed_kl")


def test_overrides_are_literal_evaluated(tmp_path):
    cfg = load_recipe(
        SMOKE,
        [
            "train.lr=5e-4",
            "model.d_model=32",
            "train.device=cpu",
            "train.betas=(0.9, 0.99)",
            "data.hub_name=None",
            "name=x",
        ],
    )
    assert cfg.train.lr == 5e-4 and cfg.model.d_model == 32 and cfg.train.device == "cpu"
    assert cfg.train.betas == (0.9, 0.99) and cfg.data.hub_name is None
    assert cfg.out_dir == "runs/smoke"  # the recipe's own out_dir wins over the name


def test_the_default_recipe_sizes_base_then_small():
    cfg = load_recipe(ROOT / "recipes" / "lohelp_en_de.yaml")
    assert cfg.size == "auto" and list(cfg.sizes) == ["base", "small"]
    assert cfg.sizes["base"].set == {"model.d_model": 256, "model.ffn_dim": 1024}
    want = {"model.d_model": 128, "model.ffn_dim": 512, "model.dropout": 0.0, "train.lr": 0.004}
    assert cfg.sizes["small"].set == want
    assert (cfg.sizes["base"].min_updates, cfg.sizes["small"].min_updates) == (1500, 0)
    small = load_recipe(ROOT / "recipes" / "lohelp_en_de.yaml", ["size=small"])
    assert (small.size, small.model.d_model, small.model.ffn_dim, small.model.n_heads) == ("small", 128, 512, 4)
    assert (small.model.dropout, small.train.lr) == (0.0, 0.004)


def test_out_dir_defaults_to_runs_name(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: abc\n")
    assert load_recipe(p).out_dir == "runs/abc"


@pytest.mark.parametrize(
    "text,match",
    [
        ("train:\n  lrr: 0.1\n", r"unknown key\(s\) \['train.lrr'\]; valid keys: \['seed'"),
        ("modle:\n  d_model: 3\n", r"unknown key\(s\) \['modle'\]"),
        ("train:\n  lr: fast\n", r"train.lr: expected float, got str 'fast'"),
        ("model:\n  enc_layers: 2.5\n", r"model.enc_layers: expected int, got float 2.5"),
        ("model:\n  pre_norm: 1\n", r"model.pre_norm: expected bool, got int 1"),
        ("train:\n  max_tokens: true\n", r"train.max_tokens: expected int, got bool True"),
        ("train:\n  betas: [0.9]\n", r"train.betas: expected a list of 2 values"),
        ("train: 3\n", r"train: expected a mapping, got int"),
        ("train: [1\n", r"not valid YAML"),
        (
            f"{LADDER}      model.d_modl: 3\n",
            r"unknown key\(s\) \['sizes.small.set.model.d_modl'\]; valid keys: \['d_model'",
        ),
        (f"{LADDER}      model: {{d_model: x}}\n", r"sizes.small.set.model.d_model: expected int, got str 'x'$"),
        (
            f"{LADDER}      modle.d_model: 3\n",
            r"unknown key\(s\) \['sizes.small.set.modle.d_model'\]; valid keys: \['data'",
        ),
        (
            f"{LADDER}      train.max_minutes: 3\n",
            r"sizes.small.set.train.max_minutes: a size may not set it \(none of data.",
        ),
        (f"size: big\n{LADDER}", r"size: 'big' is not one of the recipe's sizes \(small\) nor auto$"),
        ("sizes:\n  small:\n    set: {}\n", r"missing key\(s\) \['sizes.small.min_updates'\]$"),
        ("sizes:\n  small:\n    min_updates: many\n", r"sizes.small.min_updates: expected int, got str 'many'$"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, text, match):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_recipe(p)
    assert str(p) in str(e.value)


def test_bad_override_and_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_recipe(SMOKE, ["train.lr"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_recipe(SMOKE, ["train.nope=1"])
    with pytest.raises(FileNotFoundError, match="recipe not found: nope.yaml"):
        load_recipe("nope.yaml")


def test_to_dict_round_trips():
    cfg = load_recipe(SMOKE)
    assert to_dict(cfg)["train"]["betas"] == [0.9, 0.98]


def test_an_empty_section_takes_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\neval:\n")
    assert load_recipe(p, ["eval.beam_size=3"]).eval.beam_size == 3


def test_yaml_reads_floats_and_booleans_as_yaml_1_2(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(
        "train:\n  lr: 5e-4\n  adam_eps: 1e-8\n  end_lr: 1.E-5\nmodel:\n  pre_norm: false\ndata:\n  src_lang: no\n"
    )
    cfg = load_recipe(p)
    assert cfg.train.lr == 0.0005 and cfg.train.adam_eps == 1e-8 and cfg.train.end_lr == 1e-5
    assert cfg.model.pre_norm is False
    assert cfg.data.src_lang == "no"  # Norwegian, not YAML 1.1's False


def test_overrides_take_yaml_spellings():
    cfg = load_recipe(
        SMOKE,
        ["model.pre_norm=false", "model.tie_embeddings=true", "criterion.report_accuracy=true", "data.path=null"],
    )
    assert cfg.model.pre_norm is False and cfg.model.tie_embeddings is True
    assert cfg.criterion.report_accuracy is True and cfg.data.path is None
    assert load_recipe(SMOKE, ["criterion.report_accuracy=False", "data.src_lang=no"]).data.src_lang == "no"


@pytest.mark.parametrize("raw,value", [("010", 10), ("0o10", 8), ("0x10", 16), ("09", 9), ("-010", -10)])
def test_integers_read_as_yaml_1_2_in_recipes_and_overrides(tmp_path, raw, value):
    """YAML 1.2's core schema: decimal with leading zeros, 0o octal, 0x hexadecimal (YAML 1.1
    read 010 as 8 and refused 09 and 0o10)."""
    p = tmp_path / "r.yaml"
    p.write_text(f"train:\n  warmup_steps: {raw}\n")
    assert load_recipe(p).train.warmup_steps == value
    assert load_recipe(SMOKE, [f"train.warmup_steps={raw}"]).train.warmup_steps == value


@pytest.mark.parametrize("raw", ["1_000", "1:30", "0b11", "2024-01-01"])
def test_yaml_1_1_only_spellings_are_strings_that_the_key_refuses(tmp_path, raw):
    """``1_000`` (1000), ``1:30`` (90), ``0b11`` (3) and dates are YAML 1.1; in 1.2 they are
    strings, which an int key refuses in one line naming it, in a recipe and in an override."""
    p = tmp_path / "r.yaml"
    p.write_text(f"train:\n  warmup_steps: {raw}\n")
    with pytest.raises(ConfigError, match=f"r.yaml: train.warmup_steps: expected int, got str '{raw}'$"):
        load_recipe(p)
    with pytest.raises(ConfigError, match=f"smoke.yaml: train.warmup_steps: expected int, got str '{raw}'$"):
        load_recipe(SMOKE, [f"train.warmup_steps={raw}"])
