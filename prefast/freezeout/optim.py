"""``UnitSGD``: SGD (Nesterov momentum, weight decay) with FreezeOut's per-unit learning rates
computed on the device.

``torch.optim.SGD`` takes one float learning rate per parameter group, set from Python each
step; a tensor learning rate makes its foreach path call ``.item()`` (a host sync), and neither
can live inside a CUDA graph. Here every unit's learning rate at iteration ``j`` is computed on
the device from the schedule, ``lr_i(j) = 0.5 * lr_i(0) * (1 + cos(pi * j / max_j_i))``, with
``j`` a device scalar: a step launches a fixed sequence of kernels and never waits for the GPU.

The update is torch's SGD with ``dampening=0``: ``g += wd * p; buf = momentum * buf + g;
g' = g + momentum * buf`` (Nesterov) or ``g' = buf``; ``p -= lr * g'``. Buffers start at zero,
which gives torch's first step (``buf = g``) exactly, so there is no lazily created state and a
step can be captured from the first iteration on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from prefast.errors import ModelError, ScheduleError, check_bool, check_number
from prefast.freezeout.schedule import FreezeSchedule
from prefast.models import UnitModel
from prefast.models.base import as_int


class UnitSGD:
    """SGD over the units of ``model`` listed in ``units`` plus the head (index
    ``num_units``), each at its own scheduled learning rate."""

    def __init__(
        self,
        model: UnitModel,
        schedule: FreezeSchedule,
        units: Iterable[int],
        *,
        momentum: float,
        nesterov: bool,
        weight_decay: float,
    ) -> None:
        # a NaN momentum or a negative one trained to NaN weights ("lower --base-lr"), and
        # nesterov="no" was Nesterov's
        self.momentum = check_number("momentum", momentum, 0, error=ScheduleError)
        self.nesterov = check_bool("nesterov", nesterov, error=ScheduleError)
        self.weight_decay = check_number("weight_decay", weight_decay, 0, error=ScheduleError)
        if self.nesterov and self.momentum <= 0:
            raise ScheduleError("Nesterov momentum needs momentum > 0")
        head = model.num_units
        units = list(units)
        # unit -1 trained the last unit at the head's learning rate (lrs[-1]); 99 an IndexError
        bad = [i for i in units if as_int(i) is None or not 0 <= i < head]
        if bad:
            raise ScheduleError(
                f"UnitSGD: units must be indices in 0..{head - 1} (the head is always "
                f"included), got {bad}"
            )
        modules = {int(i): model.units[i] for i in units}
        modules[head] = model.head
        # unit index -> its trainable parameters (units without any are left out); one the
        # model's author fixed (requires_grad=False) gets no gradient and stays as it is, as
        # torch's optimizers leave it
        self.groups: dict[int, list[torch.nn.Parameter]] = {
            i: [p for p in m.parameters() if p.requires_grad] for i, m in sorted(modules.items())
        }
        self.groups = {i: ps for i, ps in self.groups.items() if ps}
        # "unit 3 (conv2): parameter body.0.weight": named in the error for a missing gradient
        self._names: dict[int, list[str]] = {
            i: [n for n, p in modules[i].named_parameters() if p.requires_grad] for i in self.groups
        }
        self._where = {i: f"unit {i} ({model.unit_names[i]})" for i in self.groups if i < head}
        self._where[head] = "the head"
        self.buffers: dict[int, list[torch.Tensor]] = {
            i: [torch.zeros_like(p, memory_format=torch.preserve_format) for p in ps]
            for i, ps in self.groups.items()
        }
        device = next(iter(model.parameters())).device
        # the schedule's per-unit constants (head last), float64 so lr matches schedule.lr
        self._lr0 = torch.tensor(schedule.initial_lr, dtype=torch.float64, device=device)
        self._max_j = torch.tensor(schedule.max_j, dtype=torch.float64, device=device)
        # the divisor of j: max_j, or 1 where max_j rounds to 0 (a unit that trains at j = 0
        # only, at lr_i(0), as schedule.lr; 0 / 0 gave it a NaN learning rate)
        self._div = torch.where(self._max_j > 0, self._max_j, 1.0)
        self.lrs = torch.zeros(head + 1, dtype=torch.float32, device=device)  # (num_units + 1,)

    @property
    def units(self) -> list[int]:
        """Indices of the units (and the head) this optimizer still updates."""
        return list(self.groups)

    def params(self) -> list[torch.nn.Parameter]:
        return [p for ps in self.groups.values() for p in ps]

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    def drop(self, i: int) -> None:
        """Unit ``i`` froze: stop updating it and forget its momentum."""
        self.groups.pop(i, None)
        self.buffers.pop(i, None)

    @torch.no_grad()
    def update_lrs(self, j: torch.Tensor) -> None:
        """``self.lrs`` at iteration ``j`` (a device scalar), in place."""
        jf = j.to(torch.float64)
        lr = 0.5 * self._lr0 * (1.0 + torch.cos(math.pi * jf / self._div))
        self.lrs.copy_(torch.where(jf > self._max_j, 0.0, lr))  # frozen: 0, as schedule.lr

    @torch.no_grad()
    def step(self, j: torch.Tensor) -> None:
        """One update at iteration ``j`` (a 0-d device tensor) from the parameters' ``.grad``."""
        self.update_lrs(j)
        for i, params in self.groups.items():
            ps: list[torch.Tensor] = list(params)
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                # torch's SGD would skip it; here it is a model's mistake (a layer built but
                # never called), named before the run trains the rest around it
                unused = next(n for n, g in zip(self._names[i], grads, strict=True) if g is None)
                raise ModelError(
                    f"{self._where[i]}: parameter {unused} got no gradient: its forward does "
                    "not use it. Remove it from the model, or set requires_grad=False on it to "
                    "keep it fixed"
                )
            gs: list[torch.Tensor] = grads  # type: ignore[assignment]
            bufs = self.buffers[i]
            if self.weight_decay != 0:
                gs = list(torch._foreach_add(gs, ps, alpha=self.weight_decay))
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, gs)
            upd = list(torch._foreach_add(gs, bufs, alpha=self.momentum)) if self.nesterov else bufs
            step = torch._foreach_mul(upd, self.lrs[i])  # lr * update, lr a 0-d device tensor
            torch._foreach_sub_(ps, list(step))

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"momentum_buffers": {str(i): [b for b in bufs] for i, bufs in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("momentum_buffers")
        if not isinstance(saved, dict) or sorted(saved, key=int) != [str(i) for i in self.groups]:
            raise ScheduleError(
                "the optimizer state covers other units than the ones still training "
                f"({sorted(saved, key=int) if isinstance(saved, dict) else saved} vs {self.units})"
            )
        for i, bufs in self.buffers.items():
            src = saved[str(i)]
            if len(src) != len(bufs) or any(
                a.shape != b.shape for a, b in zip(src, bufs, strict=False)
            ):
                raise ScheduleError(f"the optimizer state of unit {i} has other shapes")
            for b, s in zip(bufs, src, strict=True):
                b.copy_(s)


__all__ = ["UnitSGD"]
