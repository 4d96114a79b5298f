"""``Instances``: the per-image set of segments (ground truth or predictions)."""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Union

import torch

__all__ = ["Instances"]


class Instances:
    """The segments of one image, as named fields of equal length ``N``.

    Each field is anything with ``len`` and indexing: a tensor whose first dimension is ``N``
    (``gt_classes`` Long[N], ``gt_masks`` Bool[N, H, W], ``gt_boxes`` Float[N, 4]) or a list
    (``gt_captions`` list[str]). ``image_size`` is the ``(height, width)`` of the image the
    fields refer to.

    Fields are read and written as attributes (``inst.gt_classes = t``) or through
    ``set/get/has/remove``. Indexing with an int, a slice, a bool mask or a long index tensor
    returns a new ``Instances`` holding the selected segments of every field.
    """

    def __init__(self, image_size: tuple[int, int], **fields: Any):
        self._image_size = (int(image_size[0]), int(image_size[1]))
        self._fields: dict[str, Any] = {}
        for name, value in fields.items():
            self.set(name, value)

    @property
    def image_size(self) -> tuple[int, int]:
        """``(height, width)`` of the image."""
        return self._image_size

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self.set(name, value)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; "_fields" missing means __init__ has not run
        # (e.g. during unpickling), which must not recurse.
        if name == "_fields" or name not in self.__dict__.get("_fields", {}):
            raise AttributeError(f"Instances has no field {name!r}; fields: {self._field_names()}")
        return self._fields[name]

    def _field_names(self) -> list[str]:
        return list(self.__dict__.get("_fields", {}))

    def set(self, name: str, value: Any) -> None:
        """Add or replace field ``name``; its length must match the other fields."""
        value_len = len(value)
        if self._fields:
            expected = len(self)
            if value_len != expected and not (len(self._fields) == 1 and name in self._fields):
                raise ValueError(
                    f"field {name!r} has length {value_len}, but the other fields of these "
                    f"Instances have length {expected}"
                )
        self._fields[name] = value

    def has(self, name: str) -> bool:
        return name in self._fields

    def get(self, name: str) -> Any:
        return self._fields[name]

    def remove(self, name: str) -> None:
        del self._fields[name]

    def get_fields(self) -> dict[str, Any]:
        """The fields as a dict (the container's own dict, not a copy)."""
        return self._fields

    def to(self, *args: Any, **kwargs: Any) -> "Instances":
        """A copy whose tensor fields are moved with ``Tensor.to(*args, **kwargs)``."""
        moved = Instances(self._image_size)
        for name, value in self._fields.items():
            if hasattr(value, "to"):
                value = value.to(*args, **kwargs)
            moved.set(name, value)
        return moved

    def __getitem__(self, item: Union[int, slice, torch.Tensor]) -> "Instances":
        if isinstance(item, int):
            n = len(self)
            if item >= n or item < -n:
                raise IndexError(f"Instances index {item} out of range for length {n}")
            # An int keeps the dimension so every field stays a length-1 sequence.
            start = item if item >= 0 else item + n
            item = slice(start, start + 1)
        selected = Instances(self._image_size)
        for name, value in self._fields.items():
            selected.set(name, _index_field(value, item))
        return selected

    def __len__(self) -> int:
        for value in self._fields.values():
            return len(value)
        return 0  # no fields yet: an empty set of segments

    def __iter__(self) -> Iterator:
        raise TypeError("Instances is not iterable; index it or read its fields")

    @staticmethod
    def cat(instance_lists: list["Instances"]) -> "Instances":
        """Concatenate ``Instances`` of the same image size and fields along ``N``."""
        if not instance_lists:
            raise ValueError("Instances.cat needs at least one Instances")
        if len(instance_lists) == 1:
            return instance_lists[0]
        image_size = instance_lists[0].image_size
        names = list(instance_lists[0]._fields)
        for other in instance_lists[1:]:
            if other.image_size != image_size:
                raise ValueError(
                    f"cannot concatenate Instances of image sizes {image_size} and "
                    f"{other.image_size}"
                )
            if list(other._fields) != names:
                raise ValueError(
                    f"cannot concatenate Instances with fields {names} and {list(other._fields)}"
                )
        joined = Instances(image_size)
        for name in names:
            values = [inst._fields[name] for inst in instance_lists]
            first = values[0]
            if isinstance(first, torch.Tensor):
                merged = torch.cat(values, dim=0)
            elif isinstance(first, list):
                merged = list(itertools.chain(*values))
            elif hasattr(type(first), "cat"):
                merged = type(first).cat(values)
            else:
                raise TypeError(f"field {name!r} of type {type(first)} cannot be concatenated")
            joined.set(name, merged)
        return joined

    def __repr__(self) -> str:
        parts = [f"num_instances={len(self)}"]
        parts.append(f"image_height={self._image_size[0]}")
        parts.append(f"image_width={self._image_size[1]}")
        parts.append(f"fields=[{', '.join(self._fields)}]")
        return f"Instances({', '.join(parts)})"

    __str__ = __repr__


def _index_field(value: Any, item: Union[slice, torch.Tensor]) -> Any:
    """Select entries of one field; lists accept slices, bool masks and index tensors."""
    if isinstance(value, list):
        if isinstance(item, slice):
            return value[item]
        index = torch.as_tensor(item)
        if index.dtype == torch.bool:
            if index.numel() != len(value):
                raise IndexError(
                    f"boolean index of length {index.numel()} for a field of length {len(value)}"
                )
            index = index.nonzero().flatten()
        return [value[i] for i in index.flatten().tolist()]
    return value[item]
