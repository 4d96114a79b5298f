"""Global catalogs of datasets (how to load them) and their metadata (what their labels mean).

Registration is lazy: ``DatasetCatalog.register(name, func)`` stores a function, and the files
are read only when ``DatasetCatalog.get(name)`` is called.
"""

from __future__ import annotations

import logging
from collections import UserDict
from typing import Any, Callable

__all__ = ["DatasetCatalog", "MetadataCatalog", "Metadata"]


class _DatasetCatalog(UserDict):
    """Maps a dataset name to a function returning ``list[dict]`` (the dataset dicts)."""

    def register(self, name: str, func: Callable[[], list[dict]]) -> None:
        if not callable(func):
            raise TypeError(f"DatasetCatalog.register({name!r}): the loader must be callable")
        if name in self:
            raise KeyError(f"dataset {name!r} is already registered")
        self[name] = func

    def get(self, name: str) -> list[dict]:
        try:
            func = self[name]
        except KeyError as e:
            raise KeyError(
                f"dataset {name!r} is not registered. Registered: {', '.join(sorted(self))}"
            ) from e
        return func()

    def list(self) -> list[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name)

    def __str__(self) -> str:
        return f"DatasetCatalog(registered datasets: {', '.join(self.keys())})"

    __repr__ = __str__


DatasetCatalog = _DatasetCatalog()


class Metadata:
    """Attributes of one dataset (class names, colours, file roots, evaluator type...).

    Attributes are set once: setting one again to a different value raises, because two parts
    of the code disagreeing about a dataset's classes is always a bug.
    """

    def __init__(self, name: str, **kwargs: Any):
        object.__setattr__(self, "name", name)
        self.set(**kwargs)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        raise AttributeError(
            f"metadata of dataset {self.name!r} has no attribute {key!r}; "
            f"available: {sorted(self.__dict__)}"
        )

    def __setattr__(self, key: str, value: Any) -> None:
        if key in self.__dict__ and self.__dict__[key] != value:
            raise AssertionError(
                f"metadata {key!r} of dataset {self.name!r} is already {self.__dict__[key]!r}; "
                f"refusing to change it to {value!r}"
            )
        object.__setattr__(self, key, value)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def set(self, **kwargs: Any) -> "Metadata":
        for k, v in kwargs.items():
            setattr(self, k, v)
        return self

    def replace(self, **kwargs: Any) -> "Metadata":
        """Change attributes that legitimately move (file roots that follow
        ``$PIX2CAP_DATASETS``, statistics of the files last loaded); class lists and other
        identity attributes should be set once with ``set``."""
        for k, v in kwargs.items():
            object.__setattr__(self, k, v)
        return self

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    # -- class facts by contiguous id (detectron2's panoptic conventions) ------------------------

    def class_name(self, category_id: int) -> str:
        """Name of a contiguous class id: ``stuff_classes`` lists every class (detectron2's
        panoptic convention), ``thing_classes`` the things; ``"class <id>"`` when neither
        names it."""
        category_id = int(category_id)
        for key in ("stuff_classes", "thing_classes"):
            names = self.get(key)
            if names is not None and 0 <= category_id < len(names):
                return str(names[category_id])
        return f"class {category_id}"

    def is_thing(self, category_id: int) -> bool:
        """Whether a contiguous class id is a thing: one of the values of
        ``thing_dataset_id_to_contiguous_id``, else (metadata without that map) one of the
        first ``len(thing_classes)`` ids."""
        mapping = self.get("thing_dataset_id_to_contiguous_id")
        if mapping:
            return int(category_id) in {int(v) for v in mapping.values()}
        return 0 <= int(category_id) < len(self.get("thing_classes") or [])

    def __repr__(self) -> str:
        return f"Metadata({self.__dict__!r})"


class _MetadataCatalog(UserDict):
    """Maps a dataset name to its ``Metadata``, created empty on first access."""

    def get(self, name: str) -> Metadata:  # type: ignore[override]
        if name not in self:
            self[name] = Metadata(name=name)
        return self[name]

    def list(self) -> list[str]:
        return list(self.keys())

    def remove(self, name: str) -> None:
        self.pop(name)


MetadataCatalog = _MetadataCatalog()

logging.getLogger(__name__).addHandler(logging.NullHandler())
