"""The one registry type of pix2cap: fvcore's, plus short names.

Every registered object has its class (or function) name, as in fvcore and detectron2
(``MODEL.META_ARCHITECTURE: Pix2Cap``), and may have short names for configs and command lines
(``INPUT.DATASET_MAPPER_NAME: panoptic_lsj``, a dataset's ``evaluator_type: pix2cap``,
``--writer template``)::

    WRITER_REGISTRY = Registry("CAPTION_WRITER")

    @WRITER_REGISTRY.register(aliases=("template",))
    class TemplateWriter: ...

    WRITER_REGISTRY.get("template") is WRITER_REGISTRY.get("TemplateWriter")   # True
    WRITER_REGISTRY.build("template", max_relations=2)

An unknown name raises a ``KeyError`` that lists every name the registry knows.
"""

from __future__ import annotations

from typing import Any, Iterable

from fvcore.common.registry import Registry as _FvcoreRegistry

__all__ = ["Registry"]


class Registry(_FvcoreRegistry):
    """fvcore's ``Registry`` whose entries may also be found by short names (``aliases``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._aliases: dict[str, str] = {}

    # A name registered twice is a programming error; fvcore raises AssertionError for it.
    def _check_free(self, name: str) -> None:
        if name in self._obj_map or name in self._aliases:
            raise AssertionError(f"{name!r} is already registered in the {self._name} registry")

    def _do_register(self, name: str, obj: Any) -> None:
        self._check_free(name)
        self._obj_map[name] = obj

    def _add_aliases(self, name: str, aliases: Iterable[str]) -> None:
        for alias in aliases:
            self._check_free(alias)
            self._aliases[alias] = name

    def register(self, obj: Any = None, *, aliases: Iterable[str] = ()) -> Any:
        """Register ``obj`` under ``obj.__name__`` and each of ``aliases``; used bare
        (``REGISTRY.register(cls)``) or as a decorator (``@REGISTRY.register(aliases=...)``)."""
        aliases = tuple(aliases)

        def add(item: Any) -> Any:
            self._do_register(item.__name__, item)
            self._add_aliases(item.__name__, aliases)
            return item

        if obj is None:
            return add
        return add(obj)

    def canonical_name(self, name: str) -> str:
        """The registered (class) name behind ``name``, which may be an alias."""
        name = self._aliases.get(name, name)
        if name not in self._obj_map:
            raise KeyError(
                f"no {self._name} named {name!r}; choose one of {', '.join(self.names())}"
            )
        return name

    def get(self, name: str) -> Any:
        return self._obj_map[self.canonical_name(name)]

    def __contains__(self, name: str) -> bool:
        return name in self._obj_map or name in self._aliases

    def names(self) -> list[str]:
        """Every name ``get`` accepts: short names first, then registered names, each sorted."""
        return sorted(self._aliases) + sorted(self._obj_map)

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """``get(name)(*args, **kwargs)``."""
        return self.get(name)(*args, **kwargs)
