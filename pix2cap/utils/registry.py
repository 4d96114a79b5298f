"""Registering a class under a name other than its own.

fvcore's ``Registry.register`` always uses ``obj.__name__``. Config values such as
``INPUT.DATASET_MAPPER_NAME: panoptic_lsj`` or a dataset's ``evaluator_type: pix2cap`` are
short lower-case names, so these helpers register under an explicit name, with the same
duplicate check fvcore applies.
"""

from typing import Callable, TypeVar

from fvcore.common.registry import Registry

T = TypeVar("T")

__all__ = ["register_as", "build_by_name"]


def register_as(registry: Registry, name: str) -> Callable[[T], T]:
    """Class decorator: ``@register_as(EVALUATOR_REGISTRY, "pix2cap")``."""

    def decorator(obj: T) -> T:
        if name in registry:
            raise KeyError(f"{name!r} is already registered in the {registry._name} registry")
        registry._do_register(name, obj)
        return obj

    return decorator


def build_by_name(registry: Registry, name: str, aliases: dict, what: str, **kwargs):
    """``registry.get(aliases.get(name, name))(**kwargs)``; an unknown ``name`` gets an error
    listing the short names (``what`` names the kind of object in that message)."""
    try:
        cls = registry.get(aliases.get(name, name))
    except KeyError:
        raise KeyError(f"unknown {what} {name!r}; choose one of {sorted(aliases)}") from None
    return cls(**kwargs)
