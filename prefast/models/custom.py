"""Bring your own model: an ordered list of modules plus a head, as a `UnitModel`.

`prefast.train` builds its model from the registry by name (``TrainConfig.model``): register a
factory that returns `from_sequential(...)` and name it there (see `from_sequential`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from prefast.errors import ModelError
from prefast.models.base import UnitModel, as_int, check_config_json, check_own_parameters


def _units_and_names(units: object) -> tuple[list[nn.Module], list[str]]:
    """The unit list and its default names (a Sequential's child names, else unit0, ...)."""
    if isinstance(units, nn.Sequential):
        named = list(units.named_children())
        return [m for _, m in named], [n for n, _ in named]
    if isinstance(units, list | tuple | nn.ModuleList):
        items = list(units)
        return items, [f"unit{i}" for i in range(len(items))]
    raise ModelError(
        f"from_sequential: units must be a list, tuple, nn.ModuleList or nn.Sequential of "
        f"nn.Module, got {type(units).__name__}"
    )


def from_sequential(
    units: Sequence[nn.Module] | nn.Sequential,
    head: nn.Module,
    *,
    unit_names: Sequence[str] | None = None,
    cut_points: Sequence[int] = (),
    config: Mapping[str, Any] | None = None,
) -> UnitModel:
    """A `UnitModel` from your own modules: ``units`` applied in order, then ``head``.

    Each unit is what FreezeOut freezes as a whole and the boundaries between units are where
    PreFast can cache; the head is never frozen. The modules are used as given: not copied
    and not re-initialised (call `prefast.models.base.reference_init_` on the result for
    FreezeOut's initialisation). To train the model, register a factory that returns it
    (`register_model`, see this module's docstring) and name it in ``TrainConfig.model``.

    Args:
        units: the freezable units, a list (or tuple, ``nn.ModuleList``) of modules or an
            ``nn.Sequential``; each maps the previous unit's output to the next one's input.
            A unit's parameters must be its own: no module may appear twice.
        head: maps the last unit's output to logits ``(B, num_classes)``.
        unit_names: one unique name per unit; default ``unit0, unit1, ...``, or the child
            names of an ``nn.Sequential`` (``"0", "1", ...`` unless built from an OrderedDict).
        cut_points: boundaries in ``1..len(units)`` after which the activation is cheap to
            store (a pooled or narrow one); boundary ``c`` is the output of ``units[c - 1]``.
            ``recache_policy="transitions"`` caches only there.
        config: JSON-able description of the architecture. A cache's fingerprint hashes it
            (with the frozen units' weights), so put in everything that defines your
            architecture: ``{"name": <the registered name>, **every factory argument}``.
            With that, ``create_model(**model.config)`` rebuilds the model, which
            ``prefast verify`` does. Default ``{"name": "custom", "unit_names": [...],
            "cut_points": [...]}``; a config without ``"name"`` gets ``"custom"``.

    Raises:
        ModelError: a bad argument; the message names it.

    Example: a three-unit CNN, registered as ``"my_net"`` and trained for one epoch.

    >>> from torch import nn
    >>> from prefast import TrainConfig, train
    >>> from prefast.models import from_sequential, register_model
    >>> def conv(c_in, c_out, stride=1):  # conv-BN-ReLU: (c_in, H, W) -> (c_out, H/s, W/s)
    ...     return nn.Sequential(
    ...         nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
    ...         nn.BatchNorm2d(c_out),
    ...         nn.ReLU(),
    ...     )
    >>> @register_model("my_net")
    ... def my_net(*, num_classes, in_channels=3, image_size=32, width=16):
    ...     units = [conv(in_channels, width), conv(width, width), conv(width, 2 * width, stride=2)]
    ...     head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
    ...     config = {"name": "my_net", "num_classes": num_classes, "in_channels": in_channels,
    ...               "image_size": image_size, "width": width}  # everything that defines it
    ...     return from_sequential(units, head, cut_points=[1, 3], config=config)
    >>> result = train(TrainConfig(model="my_net", model_args={"width": 8}, dataset="synthetic",
    ...                            num_samples=64, epochs=1, batch_size=16, device="cpu",
    ...                            progress=False))
    >>> result.model.cut_points, result.summary["model"]["width"]
    ((1, 3), 8)
    """
    items, default_names = _units_and_names(units)
    if not items:
        raise ModelError("from_sequential: units is empty; give at least one module")
    for i, m in enumerate(items):
        if not isinstance(m, nn.Module):
            raise ModelError(
                f"from_sequential: units[{i}] must be an nn.Module, got {type(m).__name__}"
            )
    if not isinstance(head, nn.Module):
        raise ModelError(f"from_sequential: head must be an nn.Module, got {type(head).__name__}")
    check_own_parameters([*items, head], "from_sequential")

    if unit_names is None:
        names = default_names
    else:
        if isinstance(unit_names, str) or not isinstance(unit_names, Sequence):
            raise ModelError(
                f"from_sequential: unit_names must be a list of strings, got {unit_names!r}"
            )
        names = list(unit_names)
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ModelError(f"from_sequential: unit_names must be non-empty strings, got {bad}")
        if len(names) != len(items):
            raise ModelError(
                f"from_sequential: unit_names has {len(names)} names for {len(items)} units; "
                "give one name per unit"
            )
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ModelError(f"from_sequential: unit_names must be unique, duplicated: {dupes}")

    if isinstance(cut_points, np.ndarray | torch.Tensor) and cut_points.ndim == 1:
        cut_points = cut_points.tolist()  # np.cumsum of the stages' unit counts, say
    if isinstance(cut_points, str) or not isinstance(cut_points, Sequence):
        raise ModelError(f"from_sequential: cut_points must be a list of ints, got {cut_points!r}")
    n = len(items)
    # numpy integers were refused as "not boundaries in 1..n", naming boundaries in 1..n
    ints = [as_int(c) for c in cut_points]
    bad_cuts = [c for c, i in zip(cut_points, ints, strict=True) if i is None or not 1 <= i <= n]
    if bad_cuts:
        raise ModelError(
            f"from_sequential: cut_points must be boundaries in 1..{n} (after that many units), "
            f"got {bad_cuts}"
        )
    cuts = sorted({i for i in ints if i is not None})

    if config is None:
        cfg: dict[str, Any] = {"name": "custom", "unit_names": names, "cut_points": cuts}
    elif isinstance(config, Mapping):
        cfg = {"name": "custom", **config}
    else:
        raise ModelError(f"from_sequential: config must be a dict, got {type(config).__name__}")
    if not isinstance(cfg["name"], str) or not cfg["name"]:
        raise ModelError(f"from_sequential: config['name'] must be a string, got {cfg['name']!r}")
    check_config_json(cfg, "from_sequential: config")

    return UnitModel(items, head, names, transition_after=[c - 1 for c in cuts], config=cfg)


__all__ = ["from_sequential"]
