"""Config node and the ``@configurable`` decorator.

pix2cap configs are fvcore ``CfgNode`` trees loaded from YAML. Three rules keep them safe and
predictable:

* YAML is read with ``yaml.safe_load`` only; ``allow_unsafe`` is never honoured and Python
  config files are refused, so loading a config never executes code.
* ``_BASE_`` chains are resolved relative to the file that names them (fvcore's behaviour);
  a URL as ``_BASE_`` is refused, and so is a chain that includes itself.
* Keys that name local weights, model or tokenizer files (:data:`LOCAL_FILE_KEYS`, and any
  key whose name contains ``WEIGHTS``) refuse URLs and model hub names as they are set:
  pix2cap never downloads anything at run time.

Every problem with a file -- a YAML syntax error, an unknown key, a value of the wrong type --
raises :class:`ConfigError` whose message is ``"<file>: <problem>"`` and names the key; the
file is the one in the ``_BASE_`` chain that sets the key. Problems with overrides name
``config overrides`` instead of a file.

Keys that were removed are registered with :meth:`CfgNode.register_deprecated_key`: a file or
override that still sets one loads, with a warning saying where the value comes from now.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import logging
import os
from typing import Any, Callable, Optional

import yaml
from fvcore.common.config import BASE_KEY
from fvcore.common.config import CfgNode as _FvcoreCfgNode

from pix2cap.utils.errors import Pix2CapError
from pix2cap.utils.local_paths import never_downloads, remote_reference

__all__ = ["CfgNode", "get_cfg", "load_cfg", "configurable", "ConfigError", "LOCAL_FILE_KEYS"]

_YAML_SUFFIXES = (".yaml", ".yml")
# Instance attribute (kept by clone(), like yacs' own set of deprecated keys) mapping each
# deprecated key to why it is gone.
_DEPRECATION_REASONS = "__deprecation_reasons__"
# The "path" of an error in merge_from_list's KEY VALUE pairs, which come from no file.
OVERRIDES = "config overrides"

#: Keys that name a local file or folder to read weights, a model or a tokenizer from, with
#: what they should name. A URL or model hub name there is refused; so it is in any other key
#: whose last part contains ``WEIGHTS`` (then "a local weights file").
LOCAL_FILE_KEYS = {
    "MODEL.WEIGHTS": "a local checkpoint file (.pth, .pt or .safetensors)",
    "MODEL.BACKBONE.WEIGHTS": (
        "a local .safetensors/.pth/.pt file of the backbone's weights, e.g. "
        "model_zoo/backbones/<timm name>.safetensors, or package:<name>"
    ),
    "MODEL.CAPTION_HEAD.VOCAB_FILE": "a local WordPiece vocab.txt or tokenizer folder",
    "TEST.PANCAP.LM_PATH": "a local model folder (its config, weights and tokenizer files)",
    "TEST.PANCAP.EMBEDDER": (
        'a local sentence-transformers folder ("" for the packaged model, "none" for none)'
    ),
    "TEST.PANCAP.JUDGE_MODEL": (
        "a local model folder (hf_local judge) or the served model's name (openai_http judge)"
    ),
}
# Values of a local-file key that are no path at all.
_NOT_PATHS = {"TEST.PANCAP.EMBEDDER": ("none",)}
# Keys where "org/name" is legitimate without being a path: a served model's name.
_NAMES_ALLOWED = ("TEST.PANCAP.JUDGE_MODEL",)

logger = logging.getLogger(__name__)


class ConfigError(Pix2CapError, ValueError):
    """A config file or override that cannot be applied: ``"<file>: <problem>"``, the problem
    naming the key. ``ConfigError(message)`` (one argument) is accepted for problems that
    belong to no file."""


def _describe(value: Any) -> str:
    """``value`` as an error message shows it: its kind and a short repr."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{_kind(value)} {text}"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a group of keys"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _coerce(value: Any, original: Any, full_key: str, source: str) -> Any:
    """``value`` for a key whose default is ``original``, by yacs' rules: the same type, or
    None on either side, or a list for a tuple and back. Anything else is a ConfigError."""
    if type(value) is type(original) or value is None or original is None:
        return value
    if isinstance(original, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(original, list) and isinstance(value, tuple):
        return list(value)
    hint = ""
    if isinstance(original, float) and type(value) is int:
        hint = f" (write it as a float: {float(value)!r})"
    raise ConfigError(
        source,
        f"{full_key} must be {_kind(original)} like its default {original!r}, got "
        f"{_describe(value)}{hint}",
    )


def _check_local_file(full_key: str, value: Any, source: str) -> None:
    """Refuse a URL or hub name in a key that names a local file (see LOCAL_FILE_KEYS)."""
    if not isinstance(value, str) or not value.strip():
        return
    expected = LOCAL_FILE_KEYS.get(full_key)
    if expected is None:
        if "WEIGHTS" not in full_key.rpartition(".")[2]:
            return
        expected = "a local weights file"
    if value.strip().lower() in _NOT_PATHS.get(full_key, ()):
        return
    kind = remote_reference(value, org_name=full_key not in _NAMES_ALLOWED)
    if kind is not None:
        raise ConfigError(source, never_downloads(value, kind, full_key, expected))


def _yaml_problem(error: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line, column) and what."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"invalid YAML{where}: {problem}"


def _leaf_keys(full_key: str, value: Any) -> list[str]:
    """The full keys of the leaves under ``full_key`` when ``value`` is a nested mapping."""
    if not isinstance(value, dict) or not value:
        return [full_key]
    return [leaf for k, v in value.items() for leaf in _leaf_keys(f"{full_key}.{k}", v)]


class CfgNode(_FvcoreCfgNode):
    """fvcore ``CfgNode`` that only ever reads YAML, safely, explains removed keys, names the
    file and key of every problem, and refuses remote weights."""

    def register_deprecated_key(self, key: str, reason: str = "") -> None:
        """Ignore ``key`` (e.g. ``"MODEL.HEAD.DIM"``) when a file or override sets it.

        Register on the root node. ``reason`` is added to the warning logged on each use.
        """
        super().register_deprecated_key(key)
        self.__dict__.setdefault(_DEPRECATION_REASONS, {})[key] = reason

    def key_is_deprecated(self, full_key: str) -> bool:
        """True (and a warning naming the key and its reason) for a registered removed key."""
        if full_key not in self.__dict__[_FvcoreCfgNode.DEPRECATED_KEYS]:
            return False
        reason = self.__dict__.get(_DEPRECATION_REASONS, {}).get(full_key, "")
        logger.warning(
            "Config key %s was removed and is ignored%s; delete it from the config",
            full_key,
            f": {reason}" if reason else "",
        )
        return True

    # -----------------------------------------------------------------------------------------
    # Reading YAML
    # -----------------------------------------------------------------------------------------
    @classmethod
    def _yaml_chain(cls, filename: str, _including: tuple = ()) -> list[tuple[str, dict]]:
        """``[(file, its keys without _BASE_)]`` for ``filename`` and its ``_BASE_`` files,
        bases first (each base's own chain before it), so merging them in order gives fvcore's
        result."""
        filename = os.fspath(filename)
        if not filename.endswith(_YAML_SUFFIXES):
            raise ConfigError(
                filename,
                "only YAML config files are supported (Python configs are never executed)",
            )
        if not os.path.isfile(filename):
            raise ConfigError(filename, "config file not found")
        real = os.path.realpath(filename)
        if real in _including:
            raise ConfigError(filename, "its _BASE_ chain includes the file itself")
        try:
            with open(filename, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(filename, _yaml_problem(e)) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(filename, f"cannot be read ({e})") from None
        if data is None:  # an empty file sets nothing
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(
                filename,
                f"a config file must hold a mapping of keys (e.g. 'SOLVER: {{BASE_LR: 0.01}}'), "
                f"got {_kind(data)}",
            )
        bases = data.pop(BASE_KEY, None)
        chain: list[tuple[str, dict]] = []
        for base in bases if isinstance(bases, list) else ([] if bases is None else [bases]):
            if not isinstance(base, str) or not base.strip():
                raise ConfigError(
                    filename, f"{BASE_KEY} must be a file name or a list of them, got {base!r}"
                )
            kind = remote_reference(base, org_name=False)
            if kind is not None:
                raise ConfigError(
                    filename,
                    never_downloads(
                        base, kind, BASE_KEY, "a local YAML file (relative to this one)"
                    ),
                )
            path = os.path.expanduser(base)
            if not os.path.isabs(path):
                path = os.path.join(os.path.dirname(filename), path)
            if not os.path.isfile(path):
                raise ConfigError(filename, f"its {BASE_KEY} file {path} does not exist")
            chain.extend(cls._yaml_chain(path, _including + (real,)))
        chain.append((filename, data))
        return chain

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> dict:
        """The keys of ``filename`` with its ``_BASE_`` chain merged under them, as fvcore's
        method returns them (``allow_unsafe`` is ignored: YAML is always read safely).

        Raises:
            ConfigError: a missing, non-YAML or unreadable file, invalid YAML, a ``_BASE_``
                that is a URL, missing, or loops; a key that is a group in a base and a value
                in the file that inherits it.
        """
        merged: dict = {}
        for path, data in cls._yaml_chain(filename):
            cls._merge_dicts(data, merged, "", path)
        return merged

    @classmethod
    def _merge_dicts(cls, a: dict, b: dict, prefix: str, source: str) -> None:
        """Merge the YAML mapping ``a`` into ``b`` (``a`` wins), as fvcore merges bases."""
        for k, v in a.items():
            if isinstance(v, dict) and k in b:
                if not isinstance(b[k], dict):
                    raise ConfigError(
                        source, f"{prefix}{k} is a group of keys here but a value in its base"
                    )
                cls._merge_dicts(v, b[k], f"{prefix}{k}.", source)
            else:
                b[k] = v

    # -----------------------------------------------------------------------------------------
    # Merging
    # -----------------------------------------------------------------------------------------
    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        """Merge a YAML file and its ``_BASE_`` chain into this config (the root).

        Raises:
            ConfigError: as :meth:`load_yaml_with_base`, plus an unknown key, a value of the
                wrong type, a group of keys given a value (or the reverse), or a URL / hub name
                in a local-file key; the message names the file that sets the key.
        """
        for path, data in self._yaml_chain(cfg_filename):
            self._merge_checked(data, self, "", path)

    def merge_from_list(self, cfg_list: list) -> "CfgNode":
        """Merge ``["KEY", "VALUE", ...]`` overrides (values parsed as Python literals where
        they are, as yacs does); problems raise ConfigError naming ``config overrides``."""
        if len(cfg_list) % 2 != 0:
            raise ConfigError(
                OVERRIDES,
                f"overrides must come in KEY VALUE pairs, got {len(cfg_list)} items: {cfg_list}",
            )
        for key, value in zip(cfg_list[0::2], cfg_list[1::2]):
            if not isinstance(key, str) or not key or key == BASE_KEY:
                raise ConfigError(OVERRIDES, f"{key!r} is not a config key that can be overridden")
            nested: Any = value
            for part in reversed(key.split(".")):
                nested = {part: nested}
            self._merge_checked(nested, self, "", OVERRIDES)
        return self

    def _merge_checked(self, data: dict, node: "CfgNode", prefix: str, source: str) -> None:
        """yacs' ``_merge_a_into_b`` of a YAML mapping into ``node`` (called on the root),
        raising ConfigError(source, ...) with the full key for every problem."""
        for k, v in data.items():
            full_key = f"{prefix}{k}"
            if not isinstance(k, str):
                where = prefix.rstrip(".") or "the top level"
                raise ConfigError(source, f"config keys are names, got {_describe(k)} in {where}")
            if k not in node:
                if node.is_new_allowed():
                    node[k] = node._decode_cfg_value(v)
                    continue
                if self.key_is_deprecated(full_key):
                    continue
                leaves = _leaf_keys(full_key, v)
                if leaves != [full_key] and all(self.key_is_deprecated(leaf) for leaf in leaves):
                    continue
                if self.key_is_renamed(full_key):
                    try:
                        self.raise_key_rename_error(full_key)
                    except KeyError as e:
                        raise ConfigError(source, str(e.args[0])) from None
                raise ConfigError(source, self._unknown_key_problem(full_key, node))
            original = node[k]
            if isinstance(original, _FvcoreCfgNode):
                if not isinstance(v, dict):
                    members = ", ".join(list(original)[:4]) + (", ..." if len(original) > 4 else "")
                    raise ConfigError(
                        source,
                        f"{full_key} is a group of keys ({members}), got {_describe(v)}",
                    )
                self._merge_checked(v, original, f"{full_key}.", source)
                continue
            if isinstance(v, dict):
                raise ConfigError(
                    source,
                    f"{full_key} must be {_kind(original)} like its default {original!r}, got a "
                    f"group of keys ({', '.join(map(str, v))})",
                )
            value = _coerce(node._decode_cfg_value(v), original, full_key, source)
            _check_local_file(full_key, value, source)
            setattr(node, k, value)

    def _unknown_key_problem(self, full_key: str, node: "CfgNode") -> str:
        """``unknown config key X`` with the nearest known key, if one is close."""
        leaf = full_key.rpartition(".")[2]
        prefix = full_key[: len(full_key) - len(leaf)]
        close = difflib.get_close_matches(leaf, [str(k) for k in node], n=1, cutoff=0.75)
        suggestion = prefix + close[0] if close else None
        if suggestion is None:
            same_name = [key for key in self._full_keys() if key.rpartition(".")[2] == leaf]
            suggestion = same_name[0] if same_name else None
        return f"unknown config key {full_key}" + (
            f" (did you mean {suggestion}?)" if suggestion else ""
        )

    def _full_keys(self, prefix: str = "") -> list[str]:
        keys = []
        for k, v in self.items():
            if isinstance(v, CfgNode):
                keys.append(f"{prefix}{k}")
                keys.extend(v._full_keys(f"{prefix}{k}."))
            else:
                keys.append(f"{prefix}{k}")
        return keys


def get_cfg() -> CfgNode:
    """A fresh copy of the default config, with every key pix2cap knows about."""
    from .defaults import _C  # defaults builds _C with this module's CfgNode: a cycle at load

    return _C.clone()


def load_cfg(config_file: Optional[str] = None, opts: Optional[list] = None) -> CfgNode:
    """Defaults, then ``config_file`` (with its ``_BASE_`` chain), then ``opts`` overrides
    (``["KEY", "VALUE", ...]``); the result is frozen."""
    cfg = get_cfg()
    if config_file:
        cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    cfg.freeze()
    return cfg


def configurable(init_func: Optional[Callable] = None, *, from_config: Optional[Callable] = None):
    """Let a class or function be called either with keyword arguments or with a config.

    On ``__init__``::

        class Head(nn.Module):
            @configurable
            def __init__(self, *, dim: int, num_layers: int = 2): ...

            @classmethod
            def from_config(cls, cfg):
                return {"dim": cfg.MODEL.HEAD.DIM, "num_layers": cfg.MODEL.HEAD.NUM_LAYERS}

        Head(dim=8)             # plain keyword arguments, no config anywhere
        Head(cfg)               # from_config(cfg) supplies the arguments
        Head(cfg, num_layers=4) # explicit keywords override what the config says

    On a function, pass ``from_config=`` (a function taking ``cfg`` first) to the decorator.
    """
    if init_func is not None:
        if not (inspect.isfunction(init_func) and init_func.__name__ == "__init__"):
            raise TypeError("@configurable without arguments applies to __init__ only")

        @functools.wraps(init_func)
        def wrapped(self, *args, **kwargs):
            from_config_func = getattr(type(self), "from_config", None)
            if from_config_func is None or not inspect.ismethod(from_config_func):
                raise AttributeError(
                    f"{type(self).__name__} uses @configurable but has no classmethod from_config"
                )
            if _called_with_cfg(*args, **kwargs):
                explicit = _get_args_from_config(from_config_func, *args, **kwargs)
                init_func(self, **explicit)
            else:
                init_func(self, *args, **kwargs)

        return wrapped

    if from_config is None:
        raise TypeError("@configurable on a function needs from_config=")

    def decorator(func):
        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            if _called_with_cfg(*args, **kwargs):
                return func(**_get_args_from_config(from_config, *args, **kwargs))
            return func(*args, **kwargs)

        wrapped.from_config = from_config
        return wrapped

    return decorator


def _called_with_cfg(*args, **kwargs) -> bool:
    if args and isinstance(args[0], _FvcoreCfgNode):
        return True
    return isinstance(kwargs.get("cfg"), _FvcoreCfgNode)


def _get_args_from_config(from_config_func: Callable, *args, **kwargs) -> dict[str, Any]:
    """Call ``from_config`` with the config and whichever extra keywords it accepts; the
    remaining keywords override its result."""
    signature = inspect.signature(from_config_func)
    params = list(signature.parameters)
    if not params or params[0] != "cfg":
        raise TypeError(f"{from_config_func.__qualname__} must take 'cfg' as its first argument")
    accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    if accepts_var_kw:
        return from_config_func(*args, **kwargs)
    supported = set(params)
    extra = {k: kwargs.pop(k) for k in list(kwargs) if k not in supported}
    result = from_config_func(*args, **kwargs)
    result.update(extra)
    return result
