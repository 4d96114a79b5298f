"""The caption head's scene memory (MODEL.CAPTION_HEAD.MEMORY: scene) on tiny models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pix2cap.config import get_cfg
from pix2cap.modeling.caption_head import (
    DenseCaptionHead,
    SceneContext,
    build_caption_tokenizer,
    scene_context,
)
from pix2cap.modeling.caption_head.scene_memory import largest_parts, mask_boxes

from pix2cap.modeling.criterion import SetCriterion
from pix2cap.modeling.meta_arch import Pix2Cap

from .test_caption_head import tiny_head
from .test_pix2cap import make_input, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PIXEL_DIMS = (8, 8, 6)  # three pooled levels of different widths


def scene_head(**overrides):
    """The tiny head of the caption-head tests, with the scene memory."""
    kwargs = dict(memory="scene", pixel_dims=PIXEL_DIMS, max_scene_objects=4)
    kwargs.update(overrides)
    return tiny_head(**kwargs)


def image_objects(n, generator):
    """n objects of one image: query features [n, 16], 0/1 masks [n, 16, 16], 3 levels."""
    query = torch.randn(n, 16, generator=generator)
    masks = torch.zeros((n, 16, 16))
    for i in range(n):
        x = (3 * i) % 12
        masks[i, 2 + i % 10 : 6 + i % 10, x : x + 4] = 1.0
    levels = [
        torch.randn(8, 4, 4, generator=generator),
        torch.randn(8, 8, 8, generator=generator),
        torch.randn(6, 16, 16, generator=generator),
    ]
    return query, masks, levels


def batch_scene(counts, generator, max_objects=4):
    """Query features, global features and the scene of every object of images of ``counts``."""
    feats, scenes = [], []
    for n in counts:
        query, masks, levels = image_objects(n, generator)
        feats.append(query)
        scenes.append(scene_context(query, masks, levels, max_objects=max_objects))
    query = torch.cat(feats)
    return query, torch.randn(query.shape[0], 12, generator=generator), SceneContext.cat(scenes)


def big_weights(head, seed):
    """Weights far larger than the init, so logits are far from ties."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
        head.lm_bias[2] = 3.0


def test_default_memory_is_the_papers():
    cfg = get_cfg()
    assert cfg.MODEL.CAPTION_HEAD.MEMORY == "query_global"
    head = scene_head(memory="query_global", pixel_dims=())
    # The paper's head has no scene parameters, so its checkpoints keep their keys.
    assert not any(
        k.startswith(("pixel_projs", "box_embed", "memory_type")) for k in head.state_dict()
    )
    q, g = torch.randn(3, 16), torch.randn(3, 12)
    memory, valid = head.encode_scene_memory(q, g)
    assert memory.shape == (3, 2, 32) and valid is None
    with pytest.raises(ValueError, match="scene"):
        head.encode_memory(q, g, scene=batch_scene([3], torch.Generator().manual_seed(0))[2])
    with pytest.raises(ValueError, match="memory must be one of"):
        scene_head(memory="everything")


def test_scene_config_builds_a_scene_head():
    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "shapes", "pix2cap_effl0.yaml"))
    vocab = os.path.join(REPO, cfg.MODEL.CAPTION_HEAD.VOCAB_FILE)
    head = DenseCaptionHead(cfg, tokenizer=build_caption_tokenizer(vocab))
    dims = cfg.MODEL.SEM_SEG_HEAD
    assert head.memory == "scene"
    assert [p.down.in_features for p in head.pixel_projs] == [dims.CONVS_DIM] * 3 + [
        dims.MASK_DIM
    ]
    assert head.max_scene_objects == cfg.MODEL.CAPTION_HEAD.SCENE_MAX_OBJECTS


def test_mask_boxes_and_pooling():
    probs = torch.zeros(2, 8, 8)
    probs[0, 2:4, 4:8] = 1.0  # rows 2-3, columns 4-7
    probs[1, 5, 1] = 0.3  # nothing above 0.5: the box of its peak
    boxes = mask_boxes(probs)
    torch.testing.assert_close(boxes[0], torch.tensor([0.5, 0.25, 1.0, 0.5, 0.75, 0.375]))
    torch.testing.assert_close(boxes[1, :4], torch.tensor([1 / 8, 5 / 8, 2 / 8, 6 / 8]))
    # In the original image's frame: an 8 x 4 image padded to an 8 x 8 grid spans x 0-2 ...
    wide = mask_boxes(probs[:1], window=torch.tensor([0.0, 0.0, 2.0, 1.0]))
    torch.testing.assert_close(wide[0], torch.tensor([1.0, 0.25, 2.0, 0.5, 1.5, 0.375]))
    # ... and a crop of the middle half of an image keeps each object's place and size there.
    crop = mask_boxes(probs[:1], window=torch.tensor([0.25, 0.25, 0.75, 0.75]))
    torch.testing.assert_close(crop[0], torch.tensor([0.5, 0.375, 0.75, 0.5, 0.625, 0.4375]))

    query, masks, levels = image_objects(3, torch.Generator().manual_seed(0))
    scene = scene_context(query, masks, levels)
    assert [f.shape for f in scene.pixel_feats] == [(3, 8), (3, 8), (3, 6)]
    # The finest level pooled under a hard mask is the mean of the pixels inside it.
    inside = masks[0] > 0
    torch.testing.assert_close(
        scene.pixel_feats[2][0], levels[2][:, inside].mean(1), atol=1e-3, rtol=1e-3
    )


def test_boxes_of_the_largest_part_ignore_stray_pixels():
    mask = torch.zeros(1, 16, 16)
    mask[0, 4:8, 2:6] = 1.0  # the object
    mask[0, 14, 6:16] = 0.9  # a thin spur along the bottom, apart from it
    assert mask_boxes(mask)[0, 2] == 1.0  # the whole mask spans to the right edge
    torch.testing.assert_close(
        mask_boxes(mask, largest_part=True)[0, :4], torch.tensor([2 / 16, 4 / 16, 6 / 16, 8 / 16])
    )
    # An empty mask stays empty; its box is its most probable pixel's.
    assert not largest_parts(torch.zeros(1, 4, 4, dtype=torch.bool)).any()
    assert largest_parts(torch.zeros(0, 4, 4, dtype=torch.bool)).shape == (0, 4, 4)


def test_scene_memory_shapes():
    torch.manual_seed(0)
    head = scene_head()
    g = torch.Generator().manual_seed(1)
    # Images with 3, 7 and 1 objects: 2, 4 (capped) and 0 other objects per object.
    query, global_feats, scene = batch_scene([3, 7, 1], g)
    assert scene.other_feats.shape == (11, 4, 16) and scene.other_boxes.shape == (11, 4, 6)
    assert scene.other_pixel_feats.shape == (11, 4, PIXEL_DIMS[-1])
    assert scene.other_valid.sum(1).tolist() == [2] * 3 + [4] * 7 + [0]
    memory, valid = head.encode_scene_memory(query, global_feats, scene)
    # self query, global, 3 pixel levels, 4 other-object slots
    assert memory.shape == (11, 2 + 3 + 4, 32) and valid.shape == (11, 9)
    assert valid[:, :5].all() and torch.equal(valid[:, 5:], scene.other_valid)
    logits = head(query, global_feats, torch.randint(3, 50, (11, 6)), scene=scene)
    assert logits.shape == (11, 6, 50) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="SceneContext"):
        head(query, global_feats, torch.randint(3, 50, (11, 6)))
    # An object's own query, with its box, is not another object's token: types differ.
    assert head.memory_type_embeddings.weight.shape == (4, 32)


@pytest.mark.parametrize("memory", ["query_global", "scene"])
def test_teacher_forcing_reads_the_memory_as_keys_only_in_the_last_layer(memory):
    """The training pass skips the memory's states in the last layer (nothing reads them):
    the same logits and gradients as the full pass, with padded scene memories too."""
    torch.manual_seed(0)
    head = scene_head(dropout=0.0) if memory == "scene" else tiny_head(dropout=0.0)
    g = torch.Generator().manual_seed(3)
    if memory == "scene":
        query, global_feats, scene = batch_scene([3, 7, 1], g)
    else:
        query, global_feats, scene = torch.randn(5, 16, generator=g), torch.randn(5, 12), None
    ids = torch.randint(3, 50, (query.shape[0], 6), generator=g)

    def logits_and_grads(full_last_layer):
        head.zero_grad()
        mem, valid = head.encode_scene_memory(query, global_feats, scene)
        if full_last_layer:
            logits = head.lm_logits(head._decode_text(mem, ids, valid))
        else:
            logits = head(query, global_feats, ids, scene=scene)
        (logits.square().mean()).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in head.named_parameters()}

    fast, fast_grads = logits_and_grads(False)
    full, full_grads = logits_and_grads(True)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-7)
    # The first layer computes every token; the last, only the text rows (its attention
    # still reads the memory's keys and values).
    num_memory = head.encode_scene_memory(query, global_feats, scene)[0].shape[1]
    seen = []
    hooks = [layer.fc1.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
             for layer in head.layers]
    try:
        head(query, global_feats, ids, scene=scene)
    finally:
        for hook in hooks:
            hook.remove()
    n = query.shape[0]
    assert seen == [(n, num_memory + 6, 32), (n, 6, 32)]


def test_padding_is_never_attended():
    torch.manual_seed(0)
    head = scene_head().eval()
    big_weights(head, 1)
    g = torch.Generator().manual_seed(2)
    query, global_feats, scene = batch_scene([2, 5], g)
    ids = torch.randint(3, 50, (7, 5), generator=g)
    padded = ~scene.other_valid
    assert padded.any()
    with torch.no_grad():
        logits = head(query, global_feats, ids, scene=scene)
        noisy = SceneContext(
            pixel_feats=scene.pixel_feats,
            boxes=scene.boxes,
            other_feats=torch.where(padded[..., None], 100.0, scene.other_feats),
            other_boxes=torch.where(padded[..., None], -5.0, scene.other_boxes),
            other_valid=scene.other_valid,
            other_pixel_feats=torch.where(padded[..., None], 50.0, scene.other_pixel_feats),
        )
        torch.testing.assert_close(head(query, global_feats, ids, scene=noisy), logits)
        # ... and an object's logits are those it gets alone, without any padding.
        first = scene.index_select(torch.arange(2))
        alone = head(query[:2], global_feats[:2], ids[:2], scene=first)
        narrow = SceneContext(
            pixel_feats=[f[:2] for f in scene.pixel_feats],
            boxes=scene.boxes[:2],
            other_feats=scene.other_feats[:2, :1],
            other_boxes=scene.other_boxes[:2, :1],
            other_valid=scene.other_valid[:2, :1],
            other_pixel_feats=scene.other_pixel_feats[:2, :1],
        )
        torch.testing.assert_close(
            head(query[:2], global_feats[:2], ids[:2], scene=narrow), alone, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(alone, logits[:2], atol=1e-5, rtol=1e-5)
        # Real other objects do matter.
        moved = SceneContext(
            pixel_feats=scene.pixel_feats,
            boxes=scene.boxes,
            other_feats=scene.other_feats + 1.0,
            other_boxes=scene.other_boxes,
            other_valid=scene.other_valid,
            other_pixel_feats=scene.other_pixel_feats,
        )
        assert not torch.allclose(head(query, global_feats, ids, scene=moved), logits)
        # So does how they look.
        recoloured = SceneContext(
            pixel_feats=scene.pixel_feats,
            boxes=scene.boxes,
            other_feats=scene.other_feats,
            other_boxes=scene.other_boxes,
            other_valid=scene.other_valid,
            other_pixel_feats=scene.other_pixel_feats + 1.0,
        )
        assert not torch.allclose(head(query, global_feats, ids, scene=recoloured), logits)


def test_one_object_has_an_empty_scene():
    torch.manual_seed(0)
    head = scene_head()
    query, global_feats, scene = batch_scene([1], torch.Generator().manual_seed(3))
    assert scene.other_feats.shape == (1, 0, 16) and scene.other_valid.shape == (1, 0)
    memory, valid = head.encode_scene_memory(query, global_feats, scene)
    assert memory.shape == (1, 5, 32) and valid.all()
    tokens = torch.tensor([[1, 5, 6, 2]])
    loss = head.loss(query, global_feats, tokens, scene=scene)
    loss.backward()
    assert torch.isfinite(loss)
    assert head.box_embed[0].weight.grad.abs().sum() > 0
    out = head.eval().generate(query, global_feats, scene=scene, max_length=6)
    assert out.shape[0] == 1 and out[0, 0] == 1


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cached_generation_matches_uncached(num_beams):
    torch.manual_seed(0)
    head = scene_head(max_length=12).eval()
    big_weights(head, 4)
    # Memories of different lengths in one batch: 1, 3 and 6 (capped at 4) objects per image.
    query, global_feats, scene = batch_scene([1, 3, 6], torch.Generator().manual_seed(5))
    for suppress in (True, False):
        kwargs = dict(
            scene=scene, num_beams=num_beams, suppress_repeat=suppress, return_scores=True
        )
        cached, s1 = head.generate(query, global_feats, use_cache=True, **kwargs)
        full, s2 = head.generate(query, global_feats, use_cache=False, **kwargs)
        assert torch.equal(cached, full)
        torch.testing.assert_close(s1, s2)
    # Batched generation gives every object the caption it gets alone.
    batched = head.generate(query, global_feats, scene=scene, num_beams=num_beams)
    for i in (0, 2, 7):
        own = scene.index_select(torch.tensor([i]))
        width = int(own.other_valid.sum())
        own = SceneContext(
            pixel_feats=own.pixel_feats,
            boxes=own.boxes,
            other_feats=own.other_feats[:, :width],
            other_boxes=own.other_boxes[:, :width],
            other_valid=own.other_valid[:, :width],
            other_pixel_feats=own.other_pixel_feats[:, :width],
        )
        alone = head.generate(
            query[i : i + 1], global_feats[i : i + 1], scene=own, num_beams=num_beams
        )
        assert torch.equal(alone[0], batched[i, : alone.shape[1]])


def tiny_scene_model(seed=0):
    # 3 multi-scale levels and the mask features, 32 channels each.
    return tiny_model(seed, head_kwargs=dict(memory="scene", pixel_dims=(32, 32, 32, 32)))


def test_tiny_pix2cap_with_scene_memory_trains_and_infers():
    model = tiny_scene_model()
    g = torch.Generator().manual_seed(0)
    # Different sizes: the batch is padded, the boxes are normalised to each image.
    batch = [make_input(64, 64, g), make_input(48, 64, g)]
    model.train()
    losses = model(batch)
    assert {"loss_caption", "loss_caption_0", "loss_caption_1"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    head = model.caption_head
    for part in (head.box_embed, head.pixel_projs, head.memory_type_embeddings):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters()) > 0
    # The caption loss reaches the pixel decoder through the pooled features too.
    assert any(p.grad is not None for p in model.pixel_decoder.mask_features.parameters())

    model.eval()
    model.object_mask_threshold = 0.0
    model.overlap_threshold = 0.0
    with torch.no_grad():
        # No query may say "no object", so every query is a candidate segment.
        model.transformer_decoder.class_embed.bias[-1] = -20.0
        outputs = model(batch)
    for output in outputs:
        segments = output["panoptic_seg"][1]
        assert segments and all(isinstance(s["caption"], str) for s in segments)


def test_training_pools_each_target_once_per_forward(monkeypatch):
    """The targets' pooled pixel features are computed once per forward (each image, each
    level), not once per captioned layer, and the losses and gradients are those of pooling
    per layer."""
    from pix2cap.modeling import criterion as criterion_module
    from pix2cap.modeling.caption_head import scene_memory

    g = torch.Generator().manual_seed(0)
    batch = [make_input(64, 64, g), make_input(48, 64, g)]
    calls = {"criterion": 0, "scene_context": 0}

    def counting(name, pool):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return pool(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(
        criterion_module, "mask_pool", counting("criterion", criterion_module.mask_pool)
    )
    monkeypatch.setattr(
        scene_memory, "mask_pool", counting("scene_context", scene_memory.mask_pool)
    )
    results = {}
    for shared in (True, False):
        model = tiny_scene_model()
        model.criterion._scene_takes_pooled = shared
        model.train()
        calls.update(criterion=0, scene_context=0)
        losses = model(batch)
        counts = dict(calls)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[shared] = (counts, losses, grads)
    (shared_calls, shared_losses, shared_grads), (_, losses, grads) = results[True], results[False]
    captioned_layers = sum(key.startswith("loss_caption") for key in losses)
    assert captioned_layers == 3
    # 2 images x 4 pixel levels, once; the per-layer path pools again in every layer.
    assert shared_calls == {"criterion": 8, "scene_context": 0}
    assert results[False][0]["scene_context"] == 2 * captioned_layers * 4
    assert shared_losses.keys() == losses.keys() and shared_grads.keys() == grads.keys()
    for key in losses:
        torch.testing.assert_close(shared_losses[key], losses[key], rtol=1e-5, atol=1e-6)
    for name in grads:
        torch.testing.assert_close(shared_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_grid_windows_place_padded_grids_in_the_original_image():
    from pix2cap.structures import ImageList

    images = [torch.zeros(3, 64, 64), torch.zeros(3, 48, 32)]
    image_list = ImageList.from_tensors(images, 32)  # padded to 64 x 64
    # Without frames each image is its own original: the grid reaches past it where padded.
    windows = Pix2Cap.grid_windows(image_list)
    want = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 4 / 3]])
    torch.testing.assert_close(windows, want)
    # An LSJ crop covering x 0.25-0.75, y 0-0.5 of its original.
    frames = torch.tensor([[0.25, 0.0, 0.75, 0.5], [0.0, 0.0, 1.0, 1.0]])
    windows = Pix2Cap.grid_windows(image_list, frames)
    torch.testing.assert_close(windows[0], torch.tensor([0.25, 0.0, 0.75, 0.5]))
    inputs = [{"image_frame": (0.25, 0.0, 0.75, 0.5)}, {}]
    torch.testing.assert_close(Pix2Cap.image_frames(inputs).float(), frames)
    assert Pix2Cap.image_frames([{}, {}]) is None


def test_training_scene_reads_target_masks_in_the_original_frame():
    model = tiny_scene_model()
    seen = []
    scene_fn = model.criterion.caption_scene_fn
    model.criterion.caption_scene_fn = lambda *a, **k: seen.append((a, k)) or scene_fn(*a, **k)
    g = torch.Generator().manual_seed(0)
    x = make_input(64, 64, g)
    x["image_frame"] = (0.5, 0.0, 1.0, 0.5)  # the right half of the top half of the original
    model.train()
    model([x])
    (query, masks, levels, captioned), kwargs = seen[0]
    # The three matched segments' ground-truth masks (two quadrants and the rest), in the
    # matched queries' order; two have a caption.
    assert masks.shape == (3, 64, 64) and set(masks.unique().tolist()) == {0.0, 1.0}
    assert captioned.numel() == 2
    fills_quadrant = masks[:, :32, :32].flatten(1).all(1) & (masks.sum((1, 2)) == 1024)
    quadrant = int(torch.nonzero(fills_quadrant))
    boxes = mask_boxes(masks, kwargs["window"])
    # The top-left quadrant of the crop is x 0.5-0.75, y 0-0.25 of the original.
    torch.testing.assert_close(boxes[quadrant, :4], torch.tensor([0.5, 0.0, 0.75, 0.25]))
    # "predicted": the matched queries' mask probabilities on the 1/4 grid instead.
    model.criterion.caption_scene_masks = "predicted"
    seen.clear()
    model([x])
    (_, masks, _, _), _ = seen[0]
    assert masks.shape == (3, 16, 16) and 0.0 < float(masks.min()) and float(masks.max()) < 1.0
    with pytest.raises(ValueError, match="caption_scene_masks"):
        SetCriterion(
            num_classes=3, matcher=None, weight_dict={}, eos_coef=0.1, num_points=4,
            oversample_ratio=3.0, importance_sample_ratio=0.75, caption_scene_masks="gt",
        )


def test_inference_scene_reads_the_segments_final_masks():
    model = tiny_scene_model().eval()
    model.object_mask_threshold = 0.0
    model.overlap_threshold = 0.0
    seen = []
    scene_fn = model.caption_head.scene_context
    model.caption_head.scene_context = lambda *a, **k: seen.append((a, k)) or scene_fn(*a, **k)
    g = torch.Generator().manual_seed(0)
    x = make_input(48, 64, g)
    x["height"], x["width"] = 96, 128  # the original is twice the input
    with torch.no_grad():
        model.transformer_decoder.class_embed.bias[-1] = -20.0
        (output,) = model([x])
    ids, segments = output["panoptic_seg"]
    (query, masks, levels), kwargs = seen[0]
    assert masks.shape[0] == len(segments) and masks.shape[-2:] == (64, 64)  # padded input grid
    for mask, segment in zip(masks, segments):
        # Each pooling mask is the segment's final mask, resized to the input and padded.
        final = (ids == segment["id"]).float()[None, None]
        small = torch.nn.functional.interpolate(final, size=(48, 64), mode="bilinear")[0, 0]
        torch.testing.assert_close(mask[:48], small)
        assert mask[48:].abs().sum() == 0
