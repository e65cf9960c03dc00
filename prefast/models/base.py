"""`UnitModel`: an ordered list of freezable units plus a head.

A unit is the granularity at which FreezeOut freezes and at which PreFast can cache an
activation. The boundary ``b`` (an int in ``0..num_units``) names the activation after the
first ``b`` units: ``b = 0`` is the input, ``b = num_units`` is what the head sees.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from prefast.errors import ModelError


class UnitModel(nn.Module):
    """An ordered list of freezable units plus a never-frozen head.

    Args:
        units: the freezable units, applied in order.
        head: the classifier applied after the last unit; it is never frozen.
        unit_names: one unique, human-readable name per unit (``"conv1"``, ``"dense1.3"``).
        transition_after: indices of the units after which the activation is cheap to
            store; unit ``i`` listed here makes boundary ``i + 1`` a cut point.
        config: JSON-able description of how the model was built (``{"name": ...}`` plus
            every factory argument); used for fingerprints. Copied.
    """

    def __init__(
        self,
        units: Sequence[nn.Module],
        head: nn.Module,
        unit_names: Sequence[str],
        transition_after: Sequence[int] = (),
        config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if len(units) == 0:
            raise ModelError("UnitModel needs at least one unit, got none")
        if len(unit_names) != len(units):
            raise ModelError(
                f"UnitModel got {len(units)} units but {len(unit_names)} unit_names; "
                "give exactly one name per unit"
            )
        if len(set(unit_names)) != len(unit_names):
            dupes = sorted({n for n in unit_names if list(unit_names).count(n) > 1})
            raise ModelError(f"UnitModel unit_names must be unique, duplicated: {dupes}")
        # plain ints: a numpy one in cut_points was refused by boundary_shape(cut_points[0])
        after = [as_int(i) for i in transition_after]
        bad = [
            i
            for i, a in zip(transition_after, after, strict=True)
            if a is None or not 0 <= a < len(units)
        ]
        if bad:
            raise ModelError(
                f"UnitModel transition_after must hold unit indices in 0..{len(units) - 1}, "
                f"got {bad}"
            )
        overridden = [
            f
            for f in ("forward", "forward_range", "forward_head")
            if getattr(type(self), f) is not getattr(UnitModel, f)
        ]
        if overridden:
            raise ModelError(
                f"{type(self).__name__} overrides UnitModel.{overridden[0]}: a run applies the "
                "units in order and then the head (from a cache, only the units after its "
                "boundary), never a forward of its own; put the computation into the units "
                "and the head instead"
            )
        check_own_parameters([*units, head], "UnitModel")
        self.units = nn.ModuleList(units)
        self.head = head
        self.unit_names: tuple[str, ...] = tuple(unit_names)
        self.cut_points: tuple[int, ...] = tuple(sorted({i + 1 for i in after if i is not None}))
        self.config: dict[str, Any] = dict(config) if config is not None else {}

    @property
    def num_units(self) -> int:
        """Number of freezable units (the head not counted)."""
        return len(self.units)

    def _check_boundary(self, what: str, b: int) -> None:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= self.num_units:
            raise ModelError(f"{what} must be an int in 0..{self.num_units}, got {b!r}")

    def forward_range(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run ``units[start:stop]`` on ``h`` (the activation at boundary ``start``).

        ``start == stop`` returns ``h`` unchanged.
        """
        n = len(self.units)
        # a str failed comparing with 0 and a float in range(): TypeErrors naming neither
        i, j = as_int(start), as_int(stop)
        if i is None or j is None or not 0 <= i <= j <= n:
            raise ModelError(
                f"forward_range needs 0 <= start <= stop <= num_units, "
                f"got start={start}, stop={stop}, num_units={n}"
            )
        for k in range(i, j):  # index, not a slice: slicing builds a new ModuleList
            h = self.units[k](h)
        return h

    def forward_head(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the head to the activation at boundary ``num_units``; returns logits."""
        out: torch.Tensor = self.head(h)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for an input batch ``(B, C, H, W)``."""
        return self.forward_head(self.forward_range(x, 0, len(self.units)))

    @contextmanager
    def _probe(self) -> Iterator[None]:
        """Eval mode and no_grad for a dummy pass, restoring every module's training flag."""
        flags = [(m, m.training) for m in self.modules()]
        try:
            self.eval()
            with torch.no_grad():
                yield
        finally:
            for m, flag in flags:
                m.train(flag)

    def _dummy(self, input_shape: Sequence[int], n: int = 1) -> torch.Tensor:
        """A zero batch of ``n`` samples on the model's device and dtype."""
        param = next(self.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        return torch.zeros((n, *input_shape), device=device, dtype=dtype)

    def boundary_shape(self, b: int, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Per-sample shape of the activation after the first ``b`` units.

        Args:
            b: boundary in ``0..num_units``.
            input_shape: per-sample input shape, e.g. ``(3, 32, 32)``.

        Raises:
            ModelError: a unit before ``b`` returns what a cache cannot hold (see
                `boundary_shapes`).
        """
        self._check_boundary("boundary b", b)
        if b == 0:
            return tuple(int(s) for s in input_shape)
        return self._shapes(input_shape, b)[-1]

    def boundary_shapes(self, input_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Per-sample shape after ``units[0:b]`` for every ``b = 1 .. num_units``, from
        eval-mode passes of one and of two dummy samples (training flags restored).

        Raises:
            ModelError: a unit returns what a cache cannot hold: not one floating-point tensor
                with the batch first, or a per-sample shape that depends on the batch size.
        """
        return self._shapes(input_shape, self.num_units)

    def _shapes(self, input_shape: Sequence[int], stop: int) -> list[tuple[int, ...]]:
        shapes = []
        with self._probe():
            h1 = self._dummy(input_shape, 1)
            h2 = self._dummy(input_shape, 2)
            for i in range(stop):
                h1 = self._tensor_out(i, self.units[i](h1), 1)  # (1, *shape)
                h2 = self._tensor_out(i, self.units[i](h2), 2)  # (2, *shape)
                shape = tuple(h1.shape[1:])
                if tuple(h2.shape[1:]) != shape:
                    raise ModelError(
                        f"unit {i} ({self.unit_names[i]}): its output per sample is "
                        f"{shape} in a batch of 1 but {tuple(h2.shape[1:])} in a batch of 2; "
                        "a cache stores one shape per sample, whatever the batch size"
                    )
                shapes.append(shape)
        return shapes

    def _tensor_out(self, i: int, h: object, n: int) -> torch.Tensor:
        """``h``, unit ``i``'s output for a batch of ``n``, if a cache can store it (one
        floating-point tensor, batch first), else raise."""
        name = f"unit {i} ({self.unit_names[i]})"
        if not isinstance(h, torch.Tensor):
            raise ModelError(
                f"{name} returns a {type(h).__name__}, not a tensor: "
                "PreFast caches the activation after a unit, so each unit must return one "
                "tensor (--mode freezeout and --mode full do not cache)"
            )
        if h.dim() == 0 or h.shape[0] != n:
            raise ModelError(
                f"{name}: for a batch of {n} it returns shape {tuple(h.shape)}; PreFast "
                f"caches the activation after a unit per sample, so each unit must keep the "
                "batch first, (B, ...) in and out (--mode freezeout and --mode full do not cache)"
            )
        from store.layout import MAX_SAMPLE_DIMS  # the store's limit (loaded where a cache is)

        if not 1 <= h.dim() - 1 <= MAX_SAMPLE_DIMS:
            # (B,) passed, and the first cache after the unit failed in the middle of the run
            raise ModelError(
                f"{name}: for a batch of {n} it returns shape {tuple(h.shape)}, {h.dim() - 1} "
                f"dimension(s) per sample; a cache stores 1 to {MAX_SAMPLE_DIMS}: return "
                "(B, 1) for one value per sample, not (B,) (--mode freezeout and --mode full "
                "do not cache)"
            )
        if not h.is_floating_point():
            raise ModelError(
                f"{name} returns {h.dtype} activations; a cache stores floating-point ones "
                "(--mode freezeout and --mode full do not cache)"
            )
        return h

    def unit_costs(self, input_shape: Sequence[int]) -> list[int]:
        """Forward multiply-accumulates per sample of each unit, the head last.

        Counts ``Conv2d`` and ``Linear`` layers only (BN, ReLU and pooling are ignored).
        The result has ``num_units + 1`` entries.
        """
        costs = [0] * (self.num_units + 1)
        handles = []

        def counter(slot: int) -> Any:
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: Any) -> None:
                if isinstance(module, nn.Conv2d):
                    k = math.prod(module.kernel_size)
                    # out: (1, C_out, H, W); each output element costs C_in/groups * k MACs
                    costs[slot] += out.numel() * (module.in_channels // module.groups) * k
                elif isinstance(module, nn.Linear):
                    costs[slot] += out.numel() * module.in_features

            return hook

        parts: list[nn.Module] = [*self.units, self.head]
        for slot, part in enumerate(parts):
            for m in part.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    handles.append(m.register_forward_hook(counter(slot)))
        try:
            with self._probe():
                self(self._dummy(input_shape))
        finally:
            for handle in handles:
                handle.remove()
        return costs

    def extra_repr(self) -> str:
        return f"num_units={self.num_units}, cut_points={self.cut_points}"


def as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer (a numpy one or a 0-d tensor too; not a bool),
    else None."""
    if isinstance(value, bool | np.bool_):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def check_own_parameters(parts: Sequence[nn.Module], who: str) -> None:
    """Refuse a parameter or a module shared by two units (or a unit and the head), ``parts``
    being the units and then the head: freezing one would silently freeze, or keep training,
    the other. A shared module without parameters too: its train/eval flag and buffers are
    one, so a shared Dropout kept a frozen unit drawing masks (the training unit's mode) and
    a shared BatchNorm(affine=False) kept changing its running statistics."""
    owner: dict[int, int] = {}
    module_owner: dict[int, int] = {}
    for slot, part in enumerate(parts):
        what = "head" if slot == len(parts) - 1 else f"units[{slot}]"
        if not isinstance(part, nn.Module):
            raise ModelError(f"{who}: {what} must be an nn.Module, got {type(part).__name__}")
        for p in part.parameters():
            first = owner.setdefault(id(p), slot)
            if first != slot:
                raise ModelError(
                    f"{who}: {what} shares parameters with units[{first}]; each unit must own "
                    "its parameters (FreezeOut freezes one unit at a time)"
                )
        for name, m in part.named_modules():
            first = module_owner.setdefault(id(m), slot)
            if first != slot:
                at = f" (at {name!r})" if name else ""
                raise ModelError(
                    f"{who}: {what} uses the same {type(m).__name__} module as units[{first}]"
                    f"{at}; a module's train/eval mode and buffers are one for both, so freezing "
                    f"units[{first}] would change the other, or training the other would change "
                    "what the frozen unit computes: give each unit its own instance (a new "
                    "module or copy.deepcopy)"
                )


def check_config_json(config: Mapping[str, Any], who: str) -> None:
    """Raise ``ModelError`` (``who: ...``) unless a model's config is strict JSON: every cache
    records it in its store's zarr.json, which other readers refuse with NaN or Infinity in
    it (and the store writer refuses it, at the run's first cache)."""
    try:
        json.dumps(config, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ModelError(
            f"{who} must be JSON-able (str keys; numbers, strings, lists, dicts; no NaN or "
            f"infinity), as every cache records it: {e}"
        ) from None


def reference_init_(model: nn.Module) -> None:
    """Initialise in place as the FreezeOut reference does.

    Conv2d weight ~ N(0, sqrt(2 / (k * k * out_channels))), conv bias 0; BatchNorm weight 1,
    bias 0; Linear bias 0 (Linear weight keeps torch's default).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = math.prod(m.kernel_size) * m.out_channels
            nn.init.normal_(m.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d) and m.affine:
            # affine=False has neither (an AttributeError on None)
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


__all__ = ["UnitModel", "as_int", "check_config_json", "check_own_parameters", "reference_init_"]
