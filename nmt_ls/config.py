"""Typed run configuration: one frozen dataclass per section, loaded from YAML.

    cfg = load_recipe("recipes/lohelp_en_de.yaml", ["train.lr=5e-4", "model.d_model=256"])

Unknown keys and wrong types raise :class:`ConfigError` naming the key (``train.lrr``) and
listing the valid ones. The recipe and the dotted overrides take the same spellings: YAML 1.2
scalars (``5e-4`` is a float, ``true``/``false`` are booleans, ``no`` is a string), and in
overrides also Python literals (``(0.9, 0.98)``, ``None``, ``False``).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from nmt_ls.model import Architecture  # the recipe's `model:` section


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema."""


class Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the plain scalars of YAML 1.2's core schema: PyYAML follows YAML
    1.1, where ``5e-4`` (no dot) is a string, ``no`` and ``off`` are booleans, ``010`` is 8,
    ``1_000`` is 1000, ``1:30`` is 90 and ``2024-01-01`` is a date. Here ``010`` is 10, ``0o10``
    8, ``0x10`` 16, and ``1_000``, ``1:30``, ``2024-01-01`` are strings."""


_TAG = "tag:yaml.org,2002:"
_CORE = {  # tag -> (the YAML 1.2 core schema's pattern, the first characters it can match)
    "bool": (r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    "int": (r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    "float": (
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$",
        "-+.0123456789",
    ),
}
# PyYAML's null pattern is the core schema's; its merge key (<<) and its guards for !, & and * stay.
_YAML11_ONLY = {_TAG + name for name in (*_CORE, "timestamp", "value")}
Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML11_ONLY]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _name, (_pattern, _first) in _CORE.items():  # int before float: "10" is an int
    Yaml12Loader.add_implicit_resolver(_TAG + _name, re.compile(_pattern), list(_first))


def _construct_int(loader: Yaml12Loader, node) -> int:
    """A core-schema int: decimal (leading zeros allowed), ``0o`` octal or ``0x`` hexadecimal."""
    value = loader.construct_scalar(node)
    return int(value, {"0o": 8, "0x": 16}.get(value[:2], 10))


Yaml12Loader.add_constructor(_TAG + "int", _construct_int)


def parse_value(raw: str):
    """An override's value, spelled as in a recipe: a YAML 1.2 number, boolean or null; else a
    Python literal that is not a number (``(0.9, 0.98)``, ``None``, ``'runs/x'``: Python's
    ``1_000`` or ``0b11`` stay strings, as they are in a recipe); else the bare string
    (``train.device=cpu``)."""
    try:
        value = yaml.load(raw, Loader=Yaml12Loader)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, (bool, int, float)) or (value is None and raw.strip()):
        return value
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
    return raw if isinstance(value, (int, float, complex)) and not isinstance(value, bool) else value


@dataclass(frozen=True)
class DataConfig:
    corpus: str = "lohelp_en_de"  # "files" (local text/tsv/jsonl), "hf" (datasets; "hub" is an alias) or a prepared
    # corpus from nmt_ls.data.CORPORA ("lohelp_en_de": made offline, then read as files from dir)
    dir: str = "data/lohelp_en_de"  # files: a folder of {split}.{lang} pairs, {split}.tsv or {split}.jsonl
    path: str | None = None  # hf: hub name, save_to_disk folder, local data folder, or json | csv | parquet | arrow
    data_files: dict | None = None  # hf: {split: file or [files]}, as in load_dataset(path, data_files=...)
    hub_name: str | None = None  # old name of data.path (used when data.path is unset)
    hub_config: str | None = None  # the hub dataset's configuration (load_dataset's `name`); hub names only
    src_lang: str = "en"
    tgt_lang: str = "de"
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    max_len: int = 200  # whitespace tokens per side; longer pairs are dropped (reported)
    max_ratio: float = 3.0  # length ratio filter (train only)
    valid_bleu_sentences: int = 0  # >0: BLEU during training on the first N valid pairs only


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8000
    model_type: str = "unigram"


@dataclass(frozen=True)
class CriterionConfig:
    name: str = "label_smoothed_cross_entropy"
    label_smoothing: float = 0.1
    smoothing: str = "others"  # the smoothing distribution: others | uniform | others_no_pad
    implementation: str = "reference"  # reference | fused (one pass over the logits) | chunked (no logits at all)
    report_accuracy: bool = False  # token accuracy (argmax == gold) in the train and valid logs
    sentence_avg: bool = False  # normalise the loss by sentences instead of target tokens
    ignore_prefix_size: int = 0  # leading target positions left out of the loss (e.g. language tags)
    user_module: str | None = None  # imported before building, for plugin criteria


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 1
    max_tokens: int = 4096  # padded tokens per batch per worker
    update_freq: int = 1  # batches accumulated per update
    lr: float = 1e-3
    warmup_steps: int = 1000
    lr_scheduler: str = "inverse_sqrt"  # inverse_sqrt | linear | cosine (decay to end_lr at max_updates) | wsd
    end_lr: float = 0.0  # lr reached at the last update by the linear, cosine and wsd schedules
    # wsd (warmup-stable-decay): with max_updates 0 the total is planned to end at max_minutes, from the update
    # rate measured over each window of plan_window_updates updates (logged, and kept in the checkpoint)
    cooldown_fraction: float = 0.2  # wsd: share of the updates in the final cooldown to end_lr
    cooldown_shape: str = "linear"  # wsd: linear | 1-sqrt
    stable_phase: str = "constant"  # wsd: constant | inverse_sqrt
    plan_window_updates: int = 20  # wsd: updates per window over which the update rate is measured
    max_warmup_fraction: float = 0.1  # wsd planned from max_minutes: the warmup is at most this share of the run
    betas: tuple[float, float] = (0.9, 0.98)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # 0 disables clipping (the norm is still logged)
    max_epochs: int = 20
    max_updates: int = 0  # 0: no limit
    # 0: no limit; the command's time budget, set-up included (and test decoding, for `nmt-ls run`): training
    # stops at the first update past it (wsd: the budget it plans for)
    max_minutes: float = 0.0
    validate_every_updates: int = 0  # 0: validate at epoch ends only
    save_every_updates: int = 0  # 0: save at validations only
    log_every_updates: int = 50
    patience: int = 0  # validations without improvement before stopping; 0 disables
    best_metric: str = "bleu"  # bleu (higher is better) or ppl (lower is better)
    max_bad_updates: int = 5  # consecutive non-finite losses tolerated before stopping
    num_threads: int | str = "auto"  # auto (or 0): the cores this process may use, shared by its local workers
    device: str = "auto"  # auto | cpu | cuda
    # torchrun: a collective waits this long for the other workers (e.g. while rank 0 validates);
    # the wait for rank 0's set-up (corpus, tokenizer, binarizing) does not count (distributed.SETUP_TIMEOUT)
    dist_timeout_minutes: float = 30.0
    # auto: bf16 on CUDA where supported; on a CPU float32 unless bf16 is native and a probe of the run's model
    # and batches shows it faster (logged with its reason); none: float32; bf16: autocast, the loss in float32
    amp: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    beam_size: int = 5
    len_penalty: float = 1.0
    max_len_a: float = 1.2
    max_len_b: int = 10
    max_tokens: int = 8000  # source tokens per decoding batch (a longer sentence is decoded alone)


@dataclass(frozen=True)
class SizeConfig:
    """One rung of a recipe's ladder of model sizes (``sizes:``)."""

    min_updates: int  # chosen by size: auto when the time budget is estimated to hold this many updates
    set: dict | None = None  # recipe keys -> values, dotted as overrides (model.d_model: 128); none: nothing


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/run"
    # auto: the first of `sizes` whose estimated updates in train.max_minutes reach its min_updates
    # (nmt_ls.sizing), else the last; a name: that size, nothing timed
    size: str = "auto"
    sizes: dict[str, SizeConfig] = field(default_factory=dict)  # name -> SizeConfig, largest first
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: Architecture = field(default_factory=Architecture)
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted as floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is dict:
        return _coerce_mapping(value, tp, key)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _coerce_mapping(value, tp, key: str) -> dict:
    """A ``dict[str, X]`` field, ``X`` a dataclass (``sizes``): string names, each value an ``X``
    built from its own mapping; nothing under the key is an empty mapping, as for a section."""
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
    key_tp, value_tp = typing.get_args(tp)
    out = {}
    for name, item in value.items():
        name = _coerce(name, key_tp, f"{key} name")
        out[name] = from_dict(value_tp, item, f"{key}.{name}")
    return out


# Keys that were renamed: using the old one is an error that names the new one.
RENAMED = {"criterion.path": "criterion.implementation"}


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    where = f"{prefix}." if prefix else ""
    for k in unknown:
        if where + k in RENAMED:
            raise ConfigError(f"{where + k} was renamed to {RENAMED[where + k]}")
    if unknown:
        raise ConfigError(f"unknown key(s) {[where + k for k in unknown]}; valid keys: {names}")
    required = [f.name for f in dataclasses.fields(cls) if f.default is f.default_factory is dataclasses.MISSING]
    if missing := [k for k in required if k not in data]:
        raise ConfigError(f"missing key(s) {[where + k for k in missing]}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value or {}, key)
        else:
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` strings to a nested dict (values via :func:`parse_value`);
    an empty section (``eval:`` with nothing under it) takes them as a missing one does."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, raw = item.split("=", 1)
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[leaf] = parse_value(raw)
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe, apply dotted overrides and validate it into a :class:`RunConfig`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Yaml12Loader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = apply_overrides(data, overrides or [])
    try:
        cfg = resolve_sizes(from_dict(RunConfig, data), overrides or [])
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if "out_dir" not in data:
        cfg = dataclasses.replace(cfg, out_dir=f"runs/{cfg.name}")
    return cfg


# Keys that no size may set: the budget and the machine that the size is chosen by, the corpus (opened
# before the choice) and eval (which `nmt-ls run` reads from the recipe).
NOT_BY_SIZE = ("data.", "eval.", "train.max_minutes", "train.max_updates", "train.num_threads", "train.device")
NOT_BY_SIZE += ("train.seed",)  # seeded before the choice


def size_values(values: dict, prefix: str, cls=RunConfig, under: str = "") -> dict:
    """A size's ``set`` (at ``prefix``, e.g. ``sizes.small.set``) as ``{section.key: value}``,
    each value typed as the recipe key takes it; nested mappings (``model: {d_model: 128}``, as
    an override ``sizes.small.set.model.d_model=128`` makes) are flattened, the later key winning."""
    hints = typing.get_type_hints(cls)
    valid = [n for n, tp in hints.items() if dataclasses.is_dataclass(tp)] if cls is RunConfig else list(hints)
    out = {}
    for dotted, value in values.items():
        head, _, rest = str(dotted).partition(".")
        key = under + head
        if head not in valid:
            raise ConfigError(f"unknown key(s) {[f'{prefix}.{under}{dotted}']}; valid keys: {valid}")
        if dataclasses.is_dataclass(hints[head]):
            section = {rest: value} if rest else value
            if not isinstance(section, dict):
                raise ConfigError(f"{prefix}.{key}: expected a mapping, got {type(section).__name__}")
            out.update(size_values(section, prefix, hints[head], key + "."))
        elif rest:
            raise ConfigError(f"unknown key(s) {[f'{prefix}.{under}{dotted}']}; {key} is not a section")
        elif key.startswith(NOT_BY_SIZE):
            raise ConfigError(f"{prefix}.{key}: a size may not set it (none of {', '.join(NOT_BY_SIZE)})")
        else:
            out.pop(key, None)  # the later spelling goes last, as it wins
            out[key] = _coerce(value, hints[head], f"{prefix}.{key}")
    return out


def resolve_sizes(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """``cfg`` with each size's ``set`` checked and flattened (:func:`size_values`), less the keys
    that ``overrides`` set (an override wins over every size), and resolved to a pinned ``size``."""
    overridden = {item.split("=", 1)[0] for item in overrides}
    sizes = {}
    for name, size in cfg.sizes.items():
        if name == "auto":
            raise ConfigError("sizes.auto: auto is size's choice by the budget, not a name for a size")
        if size.min_updates < 0:
            raise ConfigError(f"sizes.{name}.min_updates must be >= 0, got {size.min_updates}")
        values = size_values(size.set or {}, f"sizes.{name}.set")
        sizes[name] = SizeConfig(size.min_updates, {k: v for k, v in values.items() if k not in overridden})
    cfg = dataclasses.replace(cfg, sizes=sizes)
    return cfg if cfg.size == "auto" else with_size(cfg, cfg.size)


def with_size(cfg: RunConfig, name: str) -> RunConfig:
    """``cfg`` as size ``name`` trains it: that size's ``set`` applied, ``size`` set to ``name``."""
    if name not in cfg.sizes:
        listed = ", ".join(cfg.sizes) or "none"
        raise ConfigError(f"size: {name!r} is not one of the recipe's sizes ({listed}) nor auto")
    sections: dict[str, dict] = {}
    for dotted, value in (cfg.sizes[name].set or {}).items():
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = value
    changed = {section: dataclasses.replace(getattr(cfg, section), **kw) for section, kw in sections.items()}
    return dataclasses.replace(cfg, size=name, **changed)


def to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists), for YAML files and checkpoints."""

    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(cfg))


# Model options that change no parameter: a resumed or averaged model may differ in these.
DROPOUTS = ("dropout", "attn_dropout")


def differences(section: str, ours: dict, theirs: dict, ignore: tuple[str, ...] = ()) -> list[tuple]:
    """``(section.key, ours, theirs)`` for each key whose value differs between two plain dicts
    of one section (as :func:`to_dict` writes them); a key that ``theirs`` lacks (written by an
    older nmt_ls) is not compared."""
    return [
        (f"{section}.{key}", value, theirs.get(key, value))
        for key, value in ours.items()
        if key not in ignore and theirs.get(key, value) != value
    ]
