"""pix2cap reads weights, models, tokenizers and configs from local paths only.

Nothing is downloaded at run time: a setting that names a URL (``https://...``, ``s3://...``,
``gs://...``) or a model hub (``hf://...``, ``hf-hub:org/name``, ``hub:name``, a bare
``org/name`` that is not a path on disk) is refused before anything could contact a network.
:func:`remote_reference` recognises such a value; the loaders that take these settings (the
config, the checkpointer, the backbone) raise their own error with :func:`never_downloads`'s
explanation.
"""

from __future__ import annotations

import os
import re
from typing import Optional

__all__ = ["remote_reference", "never_downloads"]

# "scheme://...": http, https, s3, gs, hf, ftp, file, ... (a Windows drive "C:\" has no "//").
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# Hub prefixes without "//": "hf-hub:org/name" (timm), "hf_hub:", "hf:", "hub:", "huggingface:".
_HUB_PREFIX_RE = re.compile(r"^(hf[-_]hub|hf|hub|huggingface|torchhub|torch\.hub):", re.IGNORECASE)
# "org/name" as the hubs write it: two name-like parts, one slash, no leading "." or "/".
_ORG_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
# A name ending like a file is a relative path whatever its shape ("output/model.pth"): when it
# is missing, "not found" is the accurate message, not "a hub name".
_FILE_SUFFIX_RE = re.compile(
    r"\.(pth|pt|pkl|bin|ckpt|safetensors|npz|h5|onnx|json|ya?ml|txt|model)$", re.IGNORECASE
)


def remote_reference(value: str, *, org_name: bool = True) -> Optional[str]:
    """What kind of remote reference ``value`` is, or None for a (possibly missing) local path.

    Args:
        value: a setting that should name a local file or folder.
        org_name: also treat ``org/name`` (one slash, no file suffix) as a hub name when no
            such path exists. Off for settings where that form is a legitimate non-path (a
            served model's name).

    Returns:
        None, or how ``value`` is remote, as the end of a sentence that starts with it:
        ``"is a URL"``, ``"names a model hub"`` or, for a missing ``org/name``, ``"is no path
        on disk and looks like a model hub name (org/name)"``. A relative path that exists is
        never remote, whatever it looks like.
    """
    value = str(value).strip()
    if not value:
        return None
    if _URL_RE.match(value):
        return "is a URL"
    if _HUB_PREFIX_RE.match(value):
        return "names a model hub"
    if (
        org_name
        and _ORG_NAME_RE.match(value)
        and not _FILE_SUFFIX_RE.search(value)
        and not os.path.exists(value)
    ):
        return "is no path on disk and looks like a model hub name (org/name)"
    return None


def never_downloads(value: str, kind: str, setting: str, expected: str) -> str:
    """The problem sentence for a refused remote ``value``.

    Args:
        value: the setting's value.
        kind: :func:`remote_reference`'s answer.
        setting: the config key (or argument) that holds the value, e.g. ``"MODEL.WEIGHTS"``.
        expected: what the setting should name instead, e.g. ``"a local checkpoint file
            (.pth or .safetensors)"``.
    """
    return (
        f"{setting} = {value!r} {kind}, and pix2cap never downloads anything at run time; "
        f"fetch it yourself and set {setting} to {expected}"
    )
