"""Config node and the ``@configurable`` decorator.

pix2cap configs are fvcore ``CfgNode`` trees loaded from YAML. Two rules keep them safe and
predictable:

* YAML is read with ``yaml.safe_load`` only; ``allow_unsafe`` is never honoured and Python
  config files are refused, so loading a config never executes code.
* ``_BASE_`` chains are resolved relative to the file that names them (fvcore's behaviour).

Keys that were removed are registered with :meth:`CfgNode.register_deprecated_key`: a file or
override that still sets one loads, with a warning saying where the value comes from now.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from typing import Any, Callable, Optional

from fvcore.common.config import CfgNode as _FvcoreCfgNode

__all__ = ["CfgNode", "get_cfg", "load_cfg", "configurable", "ConfigError"]

_YAML_SUFFIXES = (".yaml", ".yml")
# Instance attribute (kept by clone(), like yacs' own set of deprecated keys) mapping each
# deprecated key to why it is gone.
_DEPRECATION_REASONS = "__deprecation_reasons__"

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the file or key."""


class CfgNode(_FvcoreCfgNode):
    """fvcore ``CfgNode`` that only ever reads YAML, safely, and explains removed keys."""

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

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False):
        if not str(filename).endswith(_YAML_SUFFIXES):
            raise ConfigError(
                f"{filename}: only YAML config files are supported (Python configs are never "
                "executed)"
            )
        if not os.path.isfile(filename):
            raise ConfigError(f"{filename}: config file not found")
        try:
            # allow_unsafe=False makes fvcore use yaml.safe_load and never fall back.
            return super().load_yaml_with_base(filename, allow_unsafe=False)
        except ConfigError:
            raise
        except Exception as e:  # yaml.YAMLError, KeyError in a base, ...
            raise ConfigError(f"{filename}: cannot parse config: {e}") from e

    def merge_from_file(self, cfg_filename: str, allow_unsafe: bool = False) -> None:
        loaded = self.load_yaml_with_base(cfg_filename)
        loaded = type(self)(loaded)
        try:
            self.merge_from_other_cfg(loaded)
        except KeyError as e:
            raise ConfigError(f"{cfg_filename}: {e.args[0] if e.args else e}") from e

    def merge_from_list(self, cfg_list: list) -> "CfgNode":
        if len(cfg_list) % 2 != 0:
            raise ConfigError(
                f"overrides must come in KEY VALUE pairs, got {len(cfg_list)} items: {cfg_list}"
            )
        try:
            return super().merge_from_list(cfg_list)
        except (KeyError, AssertionError, ValueError) as e:
            raise ConfigError(f"bad override {cfg_list}: {e}") from e


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
