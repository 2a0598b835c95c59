"""Criterion registry: a dict, a decorator and explicit imports (no folder discovery).

    >>> crit = build_criterion("label_smoothed_cross_entropy", pad_id=0, label_smoothing=0.1)

Plugins: ``import_user_module("my_pkg.losses")`` imports a module whose
``@register_criterion("name")`` classes then build by name.
"""

from __future__ import annotations

import importlib
import inspect

from torch import nn

CRITERIONS: dict[str, type[nn.Module]] = {}


def register_criterion(name: str):
    """Class decorator adding a criterion to :data:`CRITERIONS` under ``name``."""

    def deco(cls):
        if name in CRITERIONS:
            raise ValueError(f"criterion {name!r} already registered ({CRITERIONS[name].__name__})")
        CRITERIONS[name] = cls
        return cls

    return deco


def build_criterion(name: str, **kwargs) -> nn.Module:
    """Build the criterion registered as ``name`` from flat keyword arguments.

    Unknown names and unknown arguments raise ValueError listing the valid ones.
    """
    if name not in CRITERIONS:
        raise ValueError(f"unknown criterion {name!r}; registered: {sorted(CRITERIONS)}")
    cls = CRITERIONS[name]
    params = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"criterion {name!r} got unknown argument(s) {unknown}; valid: {params}")
    return cls(**kwargs)


def import_user_module(module: str) -> None:
    """Import ``module`` (a dotted name) so that its criteria register themselves."""
    importlib.import_module(module)


# Entries, imported explicitly so that registration order is fixed.
from nmt_ls.criterions import label_smoothed  # noqa: E402,F401
from nmt_ls.criterions.functional import (  # noqa: E402,F401
    LossOutput,
    LossSpec,
    label_smoothed_cross_entropy,
    label_smoothed_nll_loss,
)
from nmt_ls.criterions.label_smoothed import (  # noqa: E402,F401
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedKLCriterion,
    reduce_metrics,
)
