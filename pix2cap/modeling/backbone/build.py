from pix2cap.utils.registry import Registry

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = """
Registry for backbones: ``forward(images: Tensor[B, 3, H, W]) -> dict[str, Tensor]`` of
multi-scale features named ``res2``..``res5`` (strides 4, 8, 16, 32).
"""
