import pytest
import torch
from torch import nn

from pix2cap.config import configurable, get_cfg
from pix2cap.data.mappers.build import DATASET_MAPPER_REGISTRY, build_dataset_mapper
from pix2cap.evaluation import EVALUATOR_REGISTRY
from pix2cap.modeling.backbone import BACKBONE_REGISTRY
from pix2cap.modeling.caption_head import CAPTION_HEAD_REGISTRY
from pix2cap.modeling.meta_arch.build import META_ARCH_REGISTRY, build_model
from pix2cap.modeling.pixel_decoder import PIXEL_DECODER_REGISTRY
from pix2cap.modeling.transformer_decoder import TRANSFORMER_DECODER_REGISTRY


class _TinyArch(nn.Module):
    @configurable
    def __init__(self, *, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(3, num_classes)

    @classmethod
    def from_config(cls, cfg):
        return {"num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES}


@pytest.fixture
def tiny_arch():
    META_ARCH_REGISTRY.register(_TinyArch)
    yield "_TinyArch"
    META_ARCH_REGISTRY._obj_map.pop("_TinyArch")


def test_build_model_by_name(tiny_arch):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = tiny_arch
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    model = build_model(cfg)
    assert isinstance(model, _TinyArch)
    assert model.classifier.out_features == 5
    assert next(model.parameters()).device == torch.device("cpu")


def test_unknown_meta_arch_lists_the_known_ones(tiny_arch):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "NoSuchArch"
    with pytest.raises(KeyError, match="NoSuchArch.*_TinyArch"):
        build_model(cfg)


def test_mapper_registry_builds_by_config_name():
    @DATASET_MAPPER_REGISTRY.register()
    class _EchoMapper:
        def __init__(self, cfg, is_train):
            self.is_train = is_train

        def __call__(self, d):
            return d

    try:
        cfg = get_cfg()
        cfg.INPUT.DATASET_MAPPER_NAME = "_EchoMapper"
        cfg.INPUT.TEST_DATASET_MAPPER_NAME = "_EchoMapper"
        assert build_dataset_mapper(cfg, is_train=True).is_train is True
        assert build_dataset_mapper(cfg, is_train=False).is_train is False
    finally:
        DATASET_MAPPER_REGISTRY._obj_map.pop("_EchoMapper")


@pytest.mark.parametrize(
    "registry, name",
    [
        (BACKBONE_REGISTRY, "BACKBONE"),
        (PIXEL_DECODER_REGISTRY, "PIXEL_DECODER"),
        (TRANSFORMER_DECODER_REGISTRY, "TRANSFORMER_DECODER"),
        (CAPTION_HEAD_REGISTRY, "CAPTION_HEAD"),
        (EVALUATOR_REGISTRY, "EVALUATOR"),
        (DATASET_MAPPER_REGISTRY, "DATASET_MAPPER"),
    ],
)
def test_registries_register_and_reject_duplicates(registry, name):
    assert registry._name == name

    class _Thing:
        pass

    registry.register(_Thing)
    try:
        assert registry.get("_Thing") is _Thing
        with pytest.raises(AssertionError):
            registry.register(_Thing)
    finally:
        registry._obj_map.pop("_Thing")
    with pytest.raises(KeyError):
        registry.get("_Thing")
