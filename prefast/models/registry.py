"""Model registry: explicit factories registered by name, and the one builder they end in.

A factory takes keyword-only arguments ``num_classes``, ``in_channels``, ``image_size`` plus
its own architecture knobs, checks them with :func:`check_common` and the validators of
``prefast.errors``, lists its units and returns :func:`build` of them. Register it with
:func:`register_model`.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from torch import nn

from prefast.errors import ModelError, check_int
from prefast.models.base import UnitModel, check_config_json, reference_init_

logger = logging.getLogger(__name__)

Factory = Callable[..., UnitModel]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}
_COMMON = ("num_classes", "in_channels", "image_size")


def register_model(name: str) -> Callable[[F], F]:
    """Decorator registering a factory under ``name``; the name must be new, and the factory
    must take the keyword arguments ``num_classes``, ``in_channels`` and ``image_size``."""
    if not isinstance(name, str) or not name:
        # e.g. @register_model without its ("name"): the factory itself arrives as the name
        raise ModelError(
            f"register_model: the name must be a non-empty string, got {name!r}; write "
            '@register_model("my_net") above the factory'
        )

    def decorator(factory: F) -> F:
        old = _REGISTRY.get(name)
        if old is not None and old is not factory:
            if not _same_definition(old, factory):
                where = f"{getattr(old, '__module__', '?')}.{getattr(old, '__qualname__', '?')}"
                raise ModelError(
                    f"model name {name!r} is already registered (by {where}); "
                    "pick another name, or unregister_model it first"
                )
            # the same function defined again: a notebook cell or a script run a second time
            logger.info("register_model(%r): replacing the earlier definition", name)
        missing = _missing_common(factory)
        if missing:
            raise ModelError(
                f"register_model({name!r}): the factory must take the keyword arguments "
                f"{', '.join(_COMMON)} (a run passes them from the dataset); "
                f"{getattr(factory, '__name__', 'it')} lacks {', '.join(missing)}"
            )
        _REGISTRY[name] = factory
        return factory

    return decorator


def _same_definition(old: Factory, new: Factory) -> bool:
    """Whether ``new`` is ``old`` defined again (same module and qualified name) rather than
    another factory claiming its name."""
    names = ("__module__", "__qualname__")
    return all(getattr(old, a, None) is not None for a in names) and all(
        getattr(old, a) == getattr(new, a, None) for a in names
    )


def _missing_common(factory: Factory) -> list[str]:
    """The arguments of ``_COMMON`` that ``factory`` cannot take by keyword."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): trust it
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    keywords = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return [c for c in _COMMON if c not in keywords]


def unregister_model(name: str) -> None:
    """Remove the factory registered under ``name`` (e.g. a test's or a notebook's model)."""
    # an unhashable name (a list) failed in the lookup with a bare TypeError
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ModelError(
            f"model {name!r} is not registered; registered: {', '.join(list_models())}"
        )
    del _REGISTRY[name]


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
    except (KeyError, TypeError):  # TypeError: an unhashable name, ["densenet_bc"]
        hint = _did_you_mean(name)
        raise ModelError(
            f"unknown model {name!r};{hint} known models: {', '.join(list_models())}"
            + (
                ""
                if hint
                else "; a model of your own must be registered (register_model) in the process "
                "that builds it: run prefast.cli.main([...]) from the script that registers it "
                "(docs/models.md)"
            )
        ) from None
    params = inspect.signature(factory).parameters.values()
    accepted = [
        p.name
        for p in params
        if p.name not in _COMMON
        and p.name != "self"
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)  # def f(**kw)
    unknown = [] if takes_any else sorted(set(kwargs) - set(accepted))
    if unknown:
        takes = f"accepted: {', '.join(accepted)}" if accepted else "it takes none"
        raise ModelError(f"model {name!r} got unknown argument(s) {unknown}; {takes}")
    # an argument without a default that is not given failed in the call, a bare TypeError
    missing = [
        p.name
        for p in params
        if p.name in accepted
        and p.kind is not inspect.Parameter.POSITIONAL_ONLY
        and p.default is inspect.Parameter.empty
        and p.name not in kwargs
    ]
    if missing:
        raise ModelError(
            f"model {name!r} needs the argument(s) {missing}, which have no default: give them "
            "(TrainConfig.model_args in a run)"
        )
    # numpy scalars (a sweep's np.arange or np.linspace) as plain Python ones: factories check
    # with isinstance and the config they record goes into JSON
    common = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    args = {k: _plain_scalar(v) for k, v in {**common, **kwargs}.items()}
    model = factory(**args)
    if not isinstance(model, UnitModel):
        raise ModelError(
            f"model {name!r}: the factory returned a {type(model).__name__}, not a UnitModel; "
            "build it with prefast.models.from_sequential"
        )
    check_config_json(model.config, f"model {name!r}: its config")  # as from_sequential's
    if model.config.get("name") != name:
        # A cache fingerprint hashes the config and `prefast verify` rebuilds the model with
        # create_model(**config): both need the registered name in it.
        warnings.warn(
            f"model {name!r}: its config names {model.config.get('name')!r}; pass "
            f"config={{'name': {name!r}, ...every factory argument}} so caches and "
            "`prefast verify` know the model",
            stacklevel=2,
        )
    logger.debug("created model %s with config %s", name, model.config)
    return model


def _plain_scalar(v: Any) -> Any:
    """A numpy integer, float or bool as an int, float or bool; anything else as it is."""
    return v.item() if isinstance(v, (np.integer, np.floating, np.bool_)) else v


def _did_you_mean(name: object) -> str:
    """`` did you mean 'densenet_bc'?`` for a near miss of a registered name (the closest, and
    any as close), else ``""``."""
    if not isinstance(name, str):
        return ""
    key = name.lower().replace("-", "_")
    scores = {n: difflib.SequenceMatcher(None, key, n.lower()).ratio() for n in _REGISTRY}
    best = max(scores.values(), default=0.0)
    if best < 0.7:
        return ""
    close = sorted(n for n, r in scores.items() if r >= best - 0.05)
    return f" did you mean {' or '.join(map(repr, close))}?"


def check_common(
    name: str, num_classes: int, in_channels: int, image_size: int, min_size: int = 1
) -> None:
    """Validate the arguments every factory takes; errors name the model and the field."""
    check_int(f"{name}: num_classes", num_classes, error=ModelError)
    check_int(f"{name}: in_channels", in_channels, error=ModelError)
    check_int(f"{name}: image_size", image_size, minimum=min_size, error=ModelError)


def build(
    name: str,
    units: Sequence[nn.Module],
    unit_names: Sequence[str],
    head: nn.Module,
    transition_after: Sequence[int],
    **config: Any,
) -> UnitModel:
    """The shared tail of every factory: the `UnitModel` with its JSON-able config
    (``{"name": name, **config}``, used in fingerprints) and the reference initialisation."""
    model = UnitModel(
        units, head, unit_names, transition_after=transition_after, config={"name": name, **config}
    )
    reference_init_(model)
    return model


__all__ = [
    "ModelError",
    "build",
    "check_common",
    "create_model",
    "list_models",
    "register_model",
    "unregister_model",
]
