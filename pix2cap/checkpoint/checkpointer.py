"""Checkpointer: fvcore's, made crash-safe and safe to load.

* Saving writes a temporary file in the target folder and ``os.replace``-s it into place, and
  updates ``last_checkpoint`` the same way, so a crash mid-save leaves the previous checkpoint
  (and the pointer to it) intact.
* Loading uses ``torch.load(..., weights_only=True)``: a checkpoint can hold tensors and plain
  containers of numbers and strings, never pickled objects, so loading one never runs code.
  Everything pix2cap saves (model, optimizer and scheduler state dicts, the iteration as an
  ``int``) fits that rule. ``.safetensors`` files load as model weights.
* Nothing is downloaded: a URL or model hub name is refused before any network access
  (fvcore's HTTP path handler is not installed), with :class:`CheckpointNotFoundError`.
* A missing, truncated, corrupt or foreign file, or one holding pickled Python objects, raises
  :class:`CheckpointError` whose message is ``"<path>: <problem>"``.
* A checkpoint that covers less than half of the model's parameter values
  (:data:`MIN_COVERAGE`) is refused unless the load is declared partial
  (``MODEL.WEIGHTS_PARTIAL``, ``Checkpointer(..., partial=True)``), so a checkpoint of another
  model never silently leaves a randomly initialised one behind.

:func:`read_weights_file` is the one place that opens weights files; the backbone loads its
weights through it too.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Optional

import torch
from fvcore.common.checkpoint import Checkpointer as _FvcoreCheckpointer
from fvcore.common.checkpoint import PeriodicCheckpointer, _strip_prefix_if_present
from iopath.common.file_io import PathManager
from torch import nn

from pix2cap.utils import comm
from pix2cap.utils.errors import Pix2CapError
from pix2cap.utils.file_io import atomic_open
from pix2cap.utils.local_paths import never_downloads, remote_reference

__all__ = [
    "Checkpointer",
    "PeriodicCheckpointer",
    "CheckpointError",
    "CheckpointNotFoundError",
    "MIN_COVERAGE",
    "atomic_torch_save",
    "check_local_weights",
    "export_model_weights",
    "parameter_coverage",
    "read_weights_file",
]

_LAST_CHECKPOINT_FILE = "last_checkpoint"
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
#: A checkpoint must hold at least this fraction of the model's parameter values (elements of
#: the parameter tensors, at the model's shapes) unless the load is declared partial.
MIN_COVERAGE = 0.5
# torch names the global a weights-only load refused: "GLOBAL numpy.core...._reconstruct".
_REFUSED_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


class CheckpointError(Pix2CapError, ValueError):
    """A checkpoint or weights file that cannot be used; the message is ``"<path>: <problem>"``."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No local file for a checkpoint or weights setting: the path does not exist or is a
    folder, or it is a URL or model hub name (pix2cap never downloads)."""


def check_local_weights(path: str, setting: str, expected: str) -> None:
    """Make sure ``path`` names a local file, without touching any network.

    Args:
        path: the weights setting's value.
        setting: the setting's name for the message, e.g. ``"MODEL.WEIGHTS"``.
        expected: what it should name, e.g. ``"a local checkpoint file (.pth or
            .safetensors)"``.

    Raises:
        CheckpointNotFoundError: ``path`` is a URL or hub name, does not exist, or is a folder.
    """
    kind = remote_reference(path)
    if kind is not None:
        raise CheckpointNotFoundError(path, never_downloads(path, kind, setting, expected))
    if os.path.isdir(path):
        raise CheckpointNotFoundError(path, f"is a folder; {setting} must name {expected}")
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(path, "checkpoint file not found")


def _first_sentence(message: str) -> str:
    """The first line/sentence of a library's error text, for a short message."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else ""
    return first.split(". ")[0].rstrip(".")


def read_weights_file(path: str) -> Any:
    """The object stored in a local ``.safetensors`` or ``.pth``/``.pt`` file, on the CPU.

    ``.safetensors`` gives a dict of tensors; anything else is read with
    ``torch.load(weights_only=True)``, so no pickled code runs.

    Raises:
        CheckpointError: the file is empty, truncated or corrupt, not a PyTorch or
            safetensors file, or holds pickled Python objects other than tensors and plain
            containers (such a file is refused, never unpickled).
    """
    if path.endswith(".safetensors"):
        # Optional dependency, needed only for this format.
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                path, f"not a readable safetensors file, corrupt or truncated ({e})"
            ) from e
    try:
        return torch.load(path, map_location=torch.device("cpu"), weights_only=True)
    except pickle.UnpicklingError as e:
        # "from None" here: torch's text (which a chained traceback would print) advises
        # turning the safety off.
        refused = _REFUSED_GLOBAL_RE.search(str(e))
        if refused is None:
            # Opcodes a weights-only unpickler does not know: random bytes or a foreign pickle.
            raise CheckpointError(path, "corrupt, or not a PyTorch checkpoint") from None
        raise CheckpointError(
            path,
            "refused: it holds pickled Python objects, not only tensors and plain containers "
            f"(loading it would import and call {refused.group(1)}); pix2cap loads checkpoints "
            "without unpickling objects. Provide the weights as a state dict of tensors "
            "(torch.save(model.state_dict(), ...)) or as a .safetensors file",
        ) from None
    except EOFError as e:
        raise CheckpointError(path, "empty or truncated checkpoint file") from e
    except (RuntimeError, zipfile.BadZipFile) as e:
        problem = f"corrupt or truncated checkpoint ({_first_sentence(e)})"
        raise CheckpointError(path, problem) from e
    except OSError as e:
        raise CheckpointError(path, f"cannot be read ({e.strerror or e})") from e
    except (KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        # The legacy (non-zip) reader trips over arbitrary bytes in many ways.
        raise CheckpointError(
            path, f"corrupt, or not a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from e


def _atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(file_object)`` on a temporary file next to ``path``, then move it over
    ``path``. On any failure the temporary file is removed and ``path`` is untouched."""
    with atomic_open(path, "wb") as f:
        write_fn(f)


def parameter_coverage(
    model: nn.Module, state_dict: dict[str, Any]
) -> tuple[list[str], list[str], int, int]:
    """How much of ``model``'s parameters ``state_dict`` holds.

    Returns:
        ``(names, matched, covered, total)``: the model's parameter names (buffers and
        uninitialised parameters left out), those ``state_dict`` holds with the model's shape,
        and the parameter values (tensor elements) of ``matched`` and of ``names``.
    """
    model_state = model.state_dict()
    names = [
        name
        for name, param in model.named_parameters(remove_duplicate=False)
        if name in model_state and not isinstance(param, nn.parameter.UninitializedParameter)
    ]
    matched = [
        name
        for name in names
        if name in state_dict
        and hasattr(state_dict[name], "shape")
        and tuple(state_dict[name].shape) == tuple(model_state[name].shape)
    ]
    covered = sum(model_state[name].numel() for name in matched)
    total = sum(model_state[name].numel() for name in names)
    return names, matched, covered, total


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a half-written ``path`` behind."""
    _atomic_write(path, lambda f: torch.save(obj, f))


class Checkpointer(_FvcoreCheckpointer):
    """fvcore ``Checkpointer`` with atomic saves, ``weights_only`` loads, ``.safetensors``
    support, no downloads, a coverage check and clear errors. Only the main process writes
    (``save_to_disk`` defaults to ``comm.is_main_process()``).

    Args:
        model: the module whose ``state_dict`` is saved as ``"model"`` (pass the unwrapped
            model, not a DistributedDataParallel wrapper, so keys have no ``module.`` prefix).
        save_dir: folder for ``<name>.pth`` files and ``last_checkpoint``.
        partial: accept checkpoints that cover less than :data:`MIN_COVERAGE` of the model's
            parameter values (``MODEL.WEIGHTS_PARTIAL``), e.g. weights of only a part of the
            model; the uncovered parameters keep their initialisation. ``load`` can override
            it per call.
        checkpointables: other objects with ``state_dict``/``load_state_dict`` (optimizer,
            scheduler, trainer...), saved under their keyword name.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: Optional[bool] = None,
        partial: bool = False,
        **checkpointables: Any,
    ):
        if save_to_disk is None:
            save_to_disk = comm.is_main_process()
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.partial = bool(partial)
        # fvcore installs an HTTP handler that downloads URLs; pix2cap reads local files only.
        self.path_manager = PathManager()

    def save(self, name: str, **kwargs: Any) -> None:
        """Write ``<save_dir>/<name>.pth`` atomically and point ``last_checkpoint`` at it.

        ``kwargs`` are extra entries (e.g. ``iteration=int``); they must be tensors, numbers,
        strings or containers of those so the file loads with ``weights_only=True``.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", save_file)
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, _LAST_CHECKPOINT_FILE)
        _atomic_write(save_file, lambda f: f.write(last_filename_basename.encode("utf-8")))

    def load(
        self,
        path: str,
        checkpointables: Optional[list[str]] = None,
        *,
        partial: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Load the model (and the ``checkpointables``; all by default) from a local file.

        Args:
            path: a local ``.pth``/``.pt``/``.safetensors`` file; ``""`` loads nothing.
            checkpointables: names of the checkpointables to restore too (``[]``: model only).
            partial: as the constructor's ``partial``; None uses the constructor's.

        Returns:
            the checkpoint's remaining entries (e.g. ``{"iteration": 4}``).

        Raises:
            CheckpointNotFoundError: ``path`` is missing, a folder, a URL or a hub name.
            CheckpointError: the file cannot be read (see :func:`read_weights_file`), holds no
                model state dict, or covers too little of the model without ``partial``.
        """
        if not path:
            self.logger.info("No checkpoint found. Initializing model from scratch")
            return {}
        path = os.fspath(path)
        check_local_weights(
            path, "MODEL.WEIGHTS", "a local checkpoint file (.pth, .pt or .safetensors)"
        )
        self.logger.info("[Checkpointer] Loading from %s ...", path)
        checkpoint = self._load_file(path)
        partial = self.partial if partial is None else partial
        self._check_coverage(path, checkpoint["model"], partial)
        incompatible = self._load_model(checkpoint)
        self._log_incompatible_keys(incompatible)
        for key in self.checkpointables if checkpointables is None else checkpointables:
            if key in checkpoint:
                self.logger.info("Loading %s from %s ...", key, path)
                self.checkpointables[key].load_state_dict(checkpoint.pop(key))
        return checkpoint

    def _check_coverage(self, path: str, state_dict: dict[str, Any], partial: bool) -> None:
        """Refuse (or, when ``partial``, warn about) a checkpoint that covers less than
        :data:`MIN_COVERAGE` of the model's parameter values.

        Coverage counts parameter *values* (tensor elements), not tensors: a file that holds
        the many small norm and bias tensors of a model but none of its large weight matrices
        covers almost nothing of it. Buffers (batch-norm statistics, fixed position tables)
        are not counted. A tensor counts when its key (after dropping a DDP ``module.``
        prefix) and its shape match the model's.
        """
        # fvcore's _load_model strips the prefix too; doing it first counts what will load.
        _strip_prefix_if_present(state_dict, "module.")
        names, matched, covered, total = parameter_coverage(self.model, state_dict)
        if total == 0:
            return
        coverage = covered / total
        numbers = (
            f"{len(matched)} of the model's {len(names)} parameter tensors, "
            f"{covered:,} of {total:,} parameter values ({coverage:.1%})"
        )
        if coverage >= MIN_COVERAGE:
            self.logger.info("Checkpoint %s covers %s", path, numbers)
            return
        if partial:
            self.logger.warning(
                "Checkpoint %s covers only %s; loading it as a partial initialisation "
                "(MODEL.WEIGHTS_PARTIAL): the rest keeps its initialisation",
                path,
                numbers,
            )
            return
        matched_set = set(matched)
        file_only = [k for k in state_dict if k not in matched_set][:3]
        model_only = [k for k in names if k not in matched_set][:3]
        raise CheckpointError(
            path,
            f"matches only {numbers}, less than the {MIN_COVERAGE:.0%} required: it is "
            f"probably not a checkpoint of this model (its keys: {', '.join(file_only) or '-'}"
            f"; the model's: {', '.join(model_only)}). To initialise only part of the model "
            "from it, set MODEL.WEIGHTS_PARTIAL True (Checkpointer(..., partial=True))",
        )

    def _load_file(self, filename: str) -> dict[str, Any]:
        """Read a ``.pth``/``.pt`` (torch zip, weights only) or ``.safetensors`` file.

        Returns:
            a dict with at least ``"model"`` (a state dict of tensors); a file holding a bare
            state dict is wrapped as ``{"model": state_dict}``.
        """
        loaded = read_weights_file(filename)
        if filename.endswith(".safetensors"):
            return {"model": loaded}
        if not isinstance(loaded, dict):
            raise CheckpointError(
                filename,
                f"not a checkpoint: it holds a {type(loaded).__name__}, not a dict with a "
                "'model' state dict",
            )
        if "model" not in loaded:
            # A bare state dict, e.g. converted or exported weights.
            if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
                return {"model": loaded}
            raise CheckpointError(
                filename,
                "not a checkpoint: no 'model' entry and not a state dict of tensors; keys: "
                f"{sorted(map(str, loaded))[:10]}",
            )
        model = loaded["model"]
        if not isinstance(model, dict) or not all(
            isinstance(v, torch.Tensor) for v in model.values()
        ):
            raise CheckpointError(
                filename, "not a checkpoint: its 'model' entry is not a state dict of tensors"
            )
        return loaded


def export_model_weights(checkpoint_path: str, output_path: str) -> dict[str, int]:
    """Write the model weights of a training checkpoint as a ``.safetensors`` file.

    Training checkpoints also hold optimizer and scheduler state; a released model needs only
    ``checkpoint["model"]``, and safetensors loads without unpickling anything. The file is
    written atomically. Returns ``{"tensors": N, "bytes": size on disk}``.
    """
    from safetensors.torch import save as save_safetensors

    if not output_path.endswith(".safetensors"):
        raise CheckpointError(output_path, "the exported file must end with .safetensors")
    check_local_weights(checkpoint_path, "the checkpoint to export", "a local checkpoint file")
    checkpoint = Checkpointer(torch.nn.Module())._load_file(checkpoint_path)
    weights = checkpoint.get("model", checkpoint)
    if not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(checkpoint_path, "holds no model state dict of tensors")
    # safetensors refuses tensors that share memory (tied weights): store each once, contiguous.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    data = save_safetensors(tensors, metadata={"source": os.path.basename(checkpoint_path)})
    _atomic_write(output_path, lambda f: f.write(data))
    return {"tensors": len(tensors), "bytes": os.path.getsize(output_path)}
