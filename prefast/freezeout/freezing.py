"""Freezing units: the one place a unit freezes, and the trainable part of a model.

A frozen unit is in eval mode (BatchNorm uses its running statistics), has no gradient and
is out of the optimizer (its momentum buffers dropped). The frozen units always form a prefix
``units[:frontier]``; the frontier only moves forward.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from prefast.freezeout.optim import UnitSGD
from prefast.models import UnitModel

log = logging.getLogger(__name__)


def _freeze_module(unit: nn.Module) -> None:
    unit.eval()
    unit.requires_grad_(False)


def freeze_unit(model: UnitModel, optimizer: UnitSGD, i: int, j: int) -> None:
    """Freeze unit ``i`` at iteration ``j``: eval mode, no gradient, out of the optimizer."""
    unit = model.units[i]
    _freeze_module(unit)
    for p in unit.parameters():
        p.grad = None
    optimizer.drop(i)
    log.info("iteration %d: froze unit %d (%s)", j, i, model.unit_names[i])


def freeze_prefix(model: UnitModel, frontier: int) -> None:
    """Put ``units[:frontier]`` in the frozen state (on resume, before the optimizer is made
    from the units that still train)."""
    for u in model.units[:frontier]:
        _freeze_module(u)


def set_train_modes(model: UnitModel, frontier: int) -> None:
    """Train mode for ``units[frontier:]`` and the head, eval for the frozen prefix."""
    for i, u in enumerate(model.units):
        u.train(i >= frontier)
    model.head.train()


class TrainablePart(nn.Module):
    """``units[frontier:]`` and the head as one module (shared, not copied), e.g. for DDP."""

    def __init__(self, model: UnitModel, frontier: int) -> None:
        super().__init__()
        self.trainable_units = nn.ModuleList(model.units[frontier:])
        self.head = model.head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for u in self.trainable_units:
            h = u(h)
        return self.head(h)


__all__ = [
    "TrainablePart",
    "freeze_prefix",
    "freeze_unit",
    "set_train_modes",
]
