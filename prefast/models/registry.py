"""Model registry: explicit factories registered by name.

A factory takes keyword-only arguments ``num_classes``, ``in_channels``, ``image_size`` plus
its own architecture knobs and returns a `UnitModel`. Register it with `register_model`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from prefast.models.base import UnitModel

logger = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model was asked for by an unknown name or with bad arguments."""


Factory = Callable[..., UnitModel]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a factory under ``name``; the name must be new."""

    def decorator(factory: F) -> F:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ModelError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def create_model(
    name: str, *, num_classes: int, in_channels: int, image_size: int, **kwargs: Any
) -> UnitModel:
    """Build the registered model ``name``.

    Args:
        name: a name from `list_models`, e.g. ``"densenet_bc"``.
        num_classes: classifier outputs.
        in_channels: input channels (3 for CIFAR, 1 for MNIST).
        image_size: input height = width in pixels.
        **kwargs: the factory's architecture arguments, e.g. ``depth=76, growth=12``.

    Raises:
        ModelError: unknown name, unknown argument, or an argument value the factory rejects.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ModelError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None
    accepted = [
        p for p in inspect.signature(factory).parameters if p not in _COMMON and p != "self"
    ]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelError(
            f"model {name!r} got unknown argument(s) {unknown}; accepted: {', '.join(accepted)}"
        )
    model = factory(
        num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs
    )
    logger.debug("created model %s with config %s", name, model.config)
    return model


_COMMON = ("num_classes", "in_channels", "image_size")


def check_positive_int(model: str, field: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` if it is an int >= ``minimum``, else raise `ModelError` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelError(f"{model}: {field} must be an int >= {minimum}, got {value!r}")
    return value


def check_choice(model: str, field: str, value: object, allowed: Iterable[object]) -> None:
    """Raise `ModelError` naming ``field`` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if isinstance(value, bool) or value not in allowed:
        raise ModelError(f"{model}: {field} must be one of {allowed}, got {value!r}")


__all__ = ["ModelError", "create_model", "list_models", "register_model"]
