import torch
from pix2cap.utils.registry import Registry

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """
Registry for meta-architectures: the whole model. A registered class is built as
``cls(cfg)`` (through ``@configurable``) and takes a list of mapper dicts in ``forward``:
it returns a dict of scalar losses in training and a list of per-image results in eval mode.
"""


def build_model(cfg) -> torch.nn.Module:
    """Build ``cfg.MODEL.META_ARCHITECTURE`` and move it to ``cfg.MODEL.DEVICE``."""
    name = cfg.MODEL.META_ARCHITECTURE
    try:
        arch = META_ARCH_REGISTRY.get(name)
    except KeyError as e:
        raise KeyError(
            f"MODEL.META_ARCHITECTURE={name!r} is not registered; known: "
            f"{sorted(k for k, _ in META_ARCH_REGISTRY)}"
        ) from e
    model = arch(cfg)
    model.to(torch.device(cfg.MODEL.DEVICE))
    return model
