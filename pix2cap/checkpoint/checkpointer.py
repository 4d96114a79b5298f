"""Checkpointer: fvcore's, made crash-safe and safe to load.

* Saving writes a temporary file in the target folder and ``os.replace``-s it into place, and
  updates ``last_checkpoint`` the same way, so a crash mid-save leaves the previous checkpoint
  (and the pointer to it) intact.
* Loading uses ``torch.load(..., weights_only=True)``: a checkpoint can hold tensors and plain
  containers of numbers and strings, never pickled objects, so loading one never runs code.
  Everything pix2cap saves (model, optimizer and scheduler state dicts, the iteration as an
  ``int``) fits that rule.
* ``.safetensors`` files load as model weights.
* A missing, truncated or foreign file raises :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from typing import Any, Optional

import torch
from fvcore.common.checkpoint import Checkpointer as _FvcoreCheckpointer
from fvcore.common.checkpoint import PeriodicCheckpointer

from pix2cap.utils import comm
from pix2cap.utils.file_io import atomic_open

__all__ = [
    "Checkpointer",
    "PeriodicCheckpointer",
    "CheckpointError",
    "atomic_torch_save",
    "export_model_weights",
]

_LAST_CHECKPOINT_FILE = "last_checkpoint"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message starts with its path."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _atomic_write(path: str, write_fn) -> None:
    """Call ``write_fn(file_object)`` on a temporary file next to ``path``, then move it over
    ``path``. On any failure the temporary file is removed and ``path`` is untouched."""
    with atomic_open(path, "wb") as f:
        write_fn(f)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` that never leaves a half-written ``path`` behind."""
    _atomic_write(path, lambda f: torch.save(obj, f))


class Checkpointer(_FvcoreCheckpointer):
    """fvcore ``Checkpointer`` with atomic saves, ``weights_only`` loads, ``.safetensors``
    support and clear errors. Only the main process writes (``save_to_disk`` defaults to
    ``comm.is_main_process()``).

    Args:
        model: the module whose ``state_dict`` is saved as ``"model"`` (pass the unwrapped
            model, not a DistributedDataParallel wrapper, so keys have no ``module.`` prefix).
        save_dir: folder for ``<name>.pth`` files and ``last_checkpoint``.
        checkpointables: other objects with ``state_dict``/``load_state_dict`` (optimizer,
            scheduler, trainer...), saved under their keyword name.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: Optional[bool] = None,
        **checkpointables: Any,
    ):
        if save_to_disk is None:
            save_to_disk = comm.is_main_process()
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)

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

    def load(self, path: str, checkpointables=None) -> dict[str, Any]:
        if path and not os.path.isfile(path):
            local = self.path_manager.get_local_path(path)
            if not os.path.isfile(local):
                raise CheckpointError(path, "checkpoint file not found")
        return super().load(path, checkpointables=checkpointables)

    def _load_file(self, filename: str) -> dict[str, Any]:
        """Read a ``.pth``/``.pt`` (torch zip, weights only) or ``.safetensors`` file.

        Returns:
            a dict with at least ``"model"`` (a state dict of tensors); a file holding a bare
            state dict is wrapped as ``{"model": state_dict}``.
        """
        if filename.endswith(".safetensors"):
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            try:
                return {"model": load_file(filename, device="cpu")}
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(filename, f"not a readable safetensors file ({e})") from e
        try:
            loaded = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                filename,
                "refusing to load: the checkpoint holds pickled Python objects that are not "
                f"tensors or plain containers (weights_only=True). Details: {e}",
            ) from e
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
            raise CheckpointError(filename, f"corrupt or truncated checkpoint ({e})") from e
        if not isinstance(loaded, dict):
            raise CheckpointError(
                filename, f"expected a dict in the checkpoint, found {type(loaded).__name__}"
            )
        if "model" not in loaded:
            # A bare state dict, e.g. converted or exported weights.
            if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
                return {"model": loaded}
            raise CheckpointError(
                filename, f"no 'model' entry in the checkpoint; keys: {sorted(loaded)[:10]}"
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
        raise ValueError(f"{output_path}: the exported file must end with .safetensors")
    checkpoint = Checkpointer(torch.nn.Module())._load_file(checkpoint_path)
    weights = checkpoint.get("model", checkpoint)
    if not weights or not all(torch.is_tensor(v) for v in weights.values()):
        raise CheckpointError(checkpoint_path, "holds no model state dict of tensors")
    # safetensors refuses tensors that share memory (tied weights): store each once, contiguous.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    data = save_safetensors(tensors, metadata={"source": os.path.basename(checkpoint_path)})
    _atomic_write(output_path, lambda f: f.write(data))
    return {"tensors": len(tensors), "bytes": os.path.getsize(output_path)}
