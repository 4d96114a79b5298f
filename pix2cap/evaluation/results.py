"""Reporting evaluation results: readable tables, an atomic JSON file, and TensorBoard scalars.

Results are the evaluators' nested dicts, ``{task: {metric: value or nested dict}}``.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Iterator

from pix2cap.utils.events import get_event_storage
from pix2cap.utils.file_io import atomic_write_json

__all__ = ["print_results_table", "write_results_json", "log_results_to_storage", "flatten_results"]

# "AP@iou0.3/meteor0.05" -> a grid with IoU rows and METEOR columns.
_GRID_KEY = re.compile(r"^(?P<name>[^@]+)@iou(?P<iou>[0-9.]+)/meteor(?P<meteor>[0-9.]+)$")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))  # counts stay integers
    if _is_scalar(value):
        value = float(value)
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    try:
        from tabulate import tabulate
    except ImportError:
        tabulate = None
    if tabulate is not None:
        return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def _section(title: str, metrics: dict) -> list[str]:
    """Tables of one (possibly nested) metrics dict."""
    out: list[str] = []
    grids: dict[str, dict[tuple[str, str], Any]] = {}
    scalars: list[list[str]] = []
    nested: list[tuple[str, dict]] = []
    for key, value in metrics.items():
        match = _GRID_KEY.match(str(key))
        if match and _is_scalar(value):
            grids.setdefault(match["name"], {})[(match["iou"], match["meteor"])] = value
        elif isinstance(value, dict):
            nested.append((f"{title}/{key}", value))
        elif isinstance(value, (list, tuple)):
            scalars.append([str(key), f"<{len(value)} items>"])
        else:
            scalars.append([str(key), _fmt(value)])
    if scalars:
        out.append(f"{title}:\n" + _table(scalars, ["metric", "value"]))
    for name, cells in grids.items():
        ious = sorted({k[0] for k in cells}, key=float)
        meteors = sorted({k[1] for k in cells}, key=float)
        rows = [
            [f"IoU {i}"] + [_fmt(cells[(i, m)]) if (i, m) in cells else "" for m in meteors]
            for i in ious
        ]
        out.append(
            f"{title}: {name} by IoU threshold x METEOR threshold:\n"
            + _table(rows, [name] + [f"METEOR>{m}" for m in meteors])
        )
    for sub_title, sub in nested:
        out.extend(_section(sub_title, sub))
    return out


def print_results_table(results: dict) -> str:
    """Readable tables of a results dict (returned, not printed, so callers can log it).

    Args:
        results: ``{task: {metric: value}}``; nested dicts get their own tables, keys of the
            form ``NAME@iou{t}/meteor{s}`` are shown as an IoU x METEOR grid.
    """
    if not isinstance(results, dict):
        raise TypeError(f"results must be a dict, got {type(results).__name__}")
    parts: list[str] = []
    top_scalars = {k: v for k, v in results.items() if not isinstance(v, dict)}
    if top_scalars:
        parts.extend(_section("results", top_scalars))
    for task, metrics in results.items():
        if isinstance(metrics, dict):
            parts.extend(_section(str(task), metrics))
    return "\n\n".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Infinity
    return value


def write_results_json(results: dict, path: str) -> None:
    """Write ``results`` to ``path`` as JSON atomically (a temporary file, then ``os.replace``).

    Non-finite floats become ``null``; numpy/torch values become plain numbers or lists.
    """
    atomic_write_json(path, _jsonable(results), indent=2, allow_nan=False)


def flatten_results(results: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(name, value)`` for every finite numeric leaf, names joined with ``/``."""
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten_results(value, prefix=name + "/")
        elif _is_scalar(value) or (hasattr(value, "ndim") and getattr(value, "ndim") == 0):
            value = float(value)
            if math.isfinite(value):
                yield name, value


def log_results_to_storage(results: dict) -> list[str]:
    """Put every finite scalar of ``results`` into the current ``EventStorage``, if any, so the
    writers (TensorBoard, ``metrics.json``) record it at the current iteration.

    Returns:
        the names put (empty when no storage is active, e.g. a standalone evaluation).
    """
    try:
        storage = get_event_storage()
    except RuntimeError:
        return []
    names = []
    for name, value in flatten_results(results):
        # Evaluation results are not noisy per-iteration values: no smoothing.
        storage.put_scalar(name, value, smoothing_hint=False)
        names.append(name)
    return names
