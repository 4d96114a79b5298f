import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from pix2cap.bridge import (
    GridBoxLogitsProcessor,
    HFCausalLMWriter,
    PanopticCaptionBridge,
    PromptFormat,
    SmallLMWriter,
    build_caption_writer,
    finetune_lora,
    train_small_lm,
)
from pix2cap.bridge.content import DecodedEntity
from pix2cap.solver.lr_scheduler import warmup_cosine_schedule
from pix2cap.data.caption_formats import (
    format_box,
    format_grid_box,
    grid_text_to_pancap,
    parse_pancap_boxes,
)
from pix2cap.solver import LRMultiplier

SHIPPED_LM = os.path.join(
    os.path.dirname(__file__), "..", "..", "model_zoo", "shapes", "bridge_small_lm"
)

H, W = 40, 60
CLASSES = ["circle", "square", "grass", "sky"]
META = {"stuff_classes": CLASSES, "thing_classes": CLASSES[:2]}


def _rect(y0, y1, x0, x1):
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def _prepared():
    bridge = PanopticCaptionBridge(None, metadata=META)
    ground = _rect(25, 40, 0, 60)
    c1, c2 = _rect(10, 25, 5, 15), _rect(12, 25, 40, 50)
    segments = [
        DecodedEntity(~(ground | c1 | c2), "sky", isthing=False, caption="light blue sky"),
        DecodedEntity(c1, "circle", caption="a red striped circle"),
        DecodedEntity(c2, "square", caption="a small blue square"),
        DecodedEntity(ground, "grass", isthing=False, caption="green grass"),
    ]
    stages, content = bridge.prepare(segments, [], (H, W))
    return stages, content


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from pix2cap.modeling.caption_head.tokenizer import build_caption_tokenizer

    path = tmp_path_factory.mktemp("tiny_lm")
    tokenizer = build_caption_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=1, n_head=2,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def test_template_writer_mentions_every_entity_with_its_box():
    stages, content = _prepared()
    caption = build_caption_writer("template")(content, stages, (H, W))
    for entity in content.entities:
        assert f"{entity.name} {format_box(entity.box)}" in caption
    boxes = parse_pancap_boxes(caption)
    assert {tuple(b["box"]) for b in boxes} == {tuple(e.box) for e in content.entities}
    assert "red striped circle" in caption and "is on the green grass" in caption
    assert "The image shows two objects" in caption
    # Deterministic.
    assert caption == build_caption_writer("template")(content, stages, (H, W))


def test_unknown_writer_name():
    with pytest.raises(KeyError, match="no CAPTION_WRITER named"):
        build_caption_writer("nope")


def test_lm_prompt_contains_stage4_and_dense_captions():
    stages, content = _prepared()
    prompt = PromptFormat().build(stages, content)
    assert prompt.startswith(stages.prompts[4])
    circle_box = content.entity(2).grid_box
    assert f"; 2. circle {format_grid_box(circle_box)}: a red striped circle;" in prompt
    # The same box as the stage-4 entity list states.
    assert f"circle {format_grid_box(circle_box)}," in stages.prompts[4]
    plain = PromptFormat(region_boxes=False).build(stages, content)
    assert "; 2. circle: a red striped circle;" in plain
    assert PromptFormat(include_dense_captions=False).build(stages, content) == stages.prompts[4]


def test_lm_prompt_with_grounded_region_captions():
    stages, content = _prepared()
    content.entities[1].caption = "a red striped circle to the right of the green star"
    raw = PromptFormat().build(stages, content)
    assert ": a red striped circle to the right of the green star;" in raw
    grounded = PromptFormat(ground_region_captions=True).build(stages, content)
    # No star was decoded: the clause becomes the circle's geometric support.
    assert ": a red striped circle on the grass;" in grounded
    assert grounded.replace("on the grass", "to the right of the green star") == raw


BOXES = [[0, 0, 999, 418], [316, 355, 418, 461], [316, 20, 400, 90]]


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_grid_box_processor_allows_only_listed_boxes():
    from pix2cap.modeling.caption_head.tokenizer import build_caption_tokenizer

    tok = build_caption_tokenizer()
    proc = GridBoxLogitsProcessor(tok, BOXES)
    first = lambda text: _ids(tok, text)[:1]  # noqa: E731

    assert proc.allowed(_ids(tok, "a grey wall")) is None
    assert proc.allowed(_ids(tok, "a grey wall <box>")) == _ids(tok, "[")
    assert proc.allowed(_ids(tok, "a wall <box>[[")) == sorted(first("0") + first("316"))
    # Two boxes start with 316: both second coordinates are allowed, nothing else.
    assert proc.allowed(_ids(tok, "a square <box>[[316, ")) == sorted(first("355") + first("20"))
    assert proc.allowed(_ids(tok, "a square <box>[[316, 355, ")) == first("418")
    assert proc.allowed(_ids(tok, "a square <box>[[316, 355, 418, 461]]</box")) == first(">")
    # A closed box, or one that is none of the listed boxes, leaves decoding free.
    assert proc.allowed(_ids(tok, "a square <box>[[316, 355, 418, 461]]</box>")) is None
    assert proc.allowed(_ids(tok, "a square <box>[[316, 355, 418, 461]]</box> is")) is None
    assert proc.allowed(_ids(tok, "a square <box>[[5")) is None


def test_grid_box_processor_boxes_follow_the_named_entity():
    from pix2cap.modeling.caption_head.tokenizer import build_caption_tokenizer

    tok = build_caption_tokenizer()
    proc = GridBoxLogitsProcessor(
        tok, BOXES, tags=["sky", "square", "square"],
        attributes=["light blue", "red", "green striped"],
    )
    first = lambda text: _ids(tok, text)[:1]  # noqa: E731

    assert proc.allowed(_ids(tok, "above the light blue sky <box>[[")) == first("0")
    # Both squares start with 316; the attribute words before the tag pick one of them.
    assert proc.allowed(_ids(tok, "left of the red square <box>[[316, ")) == first("355")
    assert proc.allowed(_ids(tok, "a large green square <box>[[316, ")) == first("20")
    # The tag alone: either square, but not the sky.
    assert proc.allowed(_ids(tok, "the square <box>[[")) == first("316")
    assert proc.allowed(_ids(tok, "the square <box>[[316, ")) == sorted(first("355") + first("20"))
    # A name that is no listed tag constrains nothing beyond the listed boxes.
    assert proc.allowed(_ids(tok, "a circle <box>[[")) == sorted(first("0") + first("316"))
    with pytest.raises(ValueError, match="2 tags for 3 boxes"):
        GridBoxLogitsProcessor(tok, BOXES, tags=["sky", "square"])


def test_grid_box_processor_masks_scores_of_open_boxes_only():
    from pix2cap.modeling.caption_head.tokenizer import build_caption_tokenizer

    tok = build_caption_tokenizer()
    proc = GridBoxLogitsProcessor(tok, BOXES)
    open_row = _ids(tok, "a square <box>[[316, ")
    free_row = _ids(tok, "a square is on the grass")
    width = max(len(open_row), len(free_row))
    pad = lambda row: [tok.pad_token_id] * (width - len(row)) + row  # noqa: E731
    input_ids = torch.tensor([pad(open_row), pad(free_row)])
    scores = torch.randn(2, len(tok))
    out = proc(input_ids, scores.clone())
    allowed = proc.allowed(open_row)
    finite = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert finite == allowed and len(allowed) == 2
    assert torch.equal(out[0, allowed], scores[0, allowed])
    assert torch.equal(out[1], scores[1])


@pytest.mark.parametrize("num_beams", [1, 3])
def test_constrained_generation_writes_a_listed_box(tiny_lm, num_beams):
    """Through transformers' generate() (greedy and beam search): a random LM that opens a
    box can only complete one of the listed boxes, token for token."""
    writer = HFCausalLMWriter(tiny_lm, max_new_tokens=24)
    tok = writer.tokenizer
    rests = {
        tuple(_ids(tok, format_grid_box(box))[len(_ids(tok, "<box>")):]) for box in BOXES
    }
    prompt = torch.tensor([[tok.cls_token_id] + _ids(tok, "a red square <box>")])
    longest = max(len(r) for r in rests)
    from transformers import LogitsProcessorList

    out = writer.model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=longest,
        do_sample=False,
        num_beams=num_beams,
        pad_token_id=tok.pad_token_id,
        logits_processor=LogitsProcessorList([GridBoxLogitsProcessor(tok, BOXES)]),
    )
    new = tuple(out[0, prompt.shape[1] :].tolist())
    assert any(new[: len(r)] == r for r in rests)


def test_hf_causal_lm_end_to_end(tiny_lm):
    stages, content = _prepared()
    writer = build_caption_writer("hf_causal_lm", model_path=tiny_lm, max_new_tokens=12)
    caption = writer(content, stages, (H, W))
    assert isinstance(caption, str)
    sampled = HFCausalLMWriter(tiny_lm, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1)
    assert isinstance(sampled(content, stages, (H, W)), str)
    with pytest.raises(ValueError, match="num_beams"):
        HFCausalLMWriter(tiny_lm, num_beams=0)


@pytest.mark.parametrize("follow_names", [True, False])
def test_writer_hands_its_decoding_settings_to_generate(tiny_lm, monkeypatch, follow_names):
    stages, content = _prepared()
    writer = HFCausalLMWriter(
        tiny_lm, max_new_tokens=8, num_beams=2, boxes_follow_names=follow_names
    )
    seen = {}
    real_generate = writer.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real_generate(**kwargs)

    monkeypatch.setattr(writer.model, "generate", spy)
    assert isinstance(writer(content, stages, (H, W)), str)
    assert seen["num_beams"] == 2 and seen["do_sample"] is False
    (processor,) = seen["logits_processor"]
    assert isinstance(processor, GridBoxLogitsProcessor)
    tok = writer.tokenizer
    listed = {tuple(_ids(tok, e.name)) for e in content.entities}
    named = {tag for _, tag, _ in processor.entities}
    # With names followed, each listed box carries its entity's tag; without, none does.
    assert named == (listed if follow_names else {()})
    assert (processor.context > 0) == follow_names


def test_hf_causal_lm_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="language model"):
        HFCausalLMWriter(str(tmp_path / "missing"))


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is not installed")
def test_lora_finetune_two_steps_saves_its_prompt_format(tiny_lm, tmp_path):
    stages, content = _prepared()
    fmt = PromptFormat(region_boxes=False)
    prompt = fmt.build(stages, content)
    target = "A circle <box>[[83, 250, 250, 625]]</box> is on the grass."
    pairs = [{"prompt": prompt, "target": target}, (prompt, target)]
    out = tmp_path / "adapter"
    losses = finetune_lora(
        pairs, str(out), model_path=tiny_lm, prompt_format=fmt, steps=2, batch_size=2, rank=2,
        alpha=4, max_length=256, log_every=0,
    )
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (out / "adapter_config.json").is_file()
    writer = HFCausalLMWriter(tiny_lm, adapter_path=str(out), max_new_tokens=6)
    assert writer.prompt_format == fmt
    assert isinstance(writer(content, stages, (H, W)), str)


@pytest.mark.parametrize("copy_head", [True, False])
def test_small_lm_trains_and_generates(tmp_path, copy_head):
    from pix2cap.bridge.copy_lm import CopyGPT2LMHeadModel

    stages, content = _prepared()
    fmt = PromptFormat(ground_region_captions=copy_head)
    prompt = fmt.build(stages, content)
    target = "A red circle <box>[[83, 250, 250, 625]]</box> is on the grass."
    pairs = [{"prompt": prompt, "target": target}] * 3
    out = tmp_path / "small_lm"
    result = train_small_lm(
        pairs, str(out), steps=10, prompt_format=fmt, n_layer=1, n_embd=32, n_head=2,
        n_positions=320, max_target_tokens=48, batch_size=2, lr=3e-3, log_every=0,
        copy_head=copy_head,
    )
    assert result["losses"][-1] < result["losses"][0]
    assert os.path.isfile(out / "model.safetensors") and os.path.isfile(out / "tokenizer.json")
    writer = build_caption_writer("small_lm", model_path=str(out), max_new_tokens=24)
    assert isinstance(writer, SmallLMWriter)
    assert isinstance(writer.model, CopyGPT2LMHeadModel) == copy_head
    # The prompt form it was trained with is read back from its folder.
    assert writer.prompt_format == fmt
    caption = writer(content, stages, (H, W))
    assert isinstance(caption, str) and caption
    # Grid boxes the LM writes come back in SA-Pancap form.
    assert "<box>" not in caption


def test_dense_caption_concat_writers():
    from pix2cap.bridge.build import build_caption_writer
    from pix2cap.bridge.content import Entity, PanopticContent

    def entity(i, name, caption, box):
        return Entity(id=i, name=name, box=box, grid_box=None, isthing=True, score=1.0,
                      caption=caption, area=10, segment_id=i, source="segment")

    content = PanopticContent(
        entities=[entity(1, "circle", "a red circle left of the star.", [0.1, 0.2, 0.3, 0.4]),
                  entity(2, "star", "", [0.5, 0.5, 0.6, 0.6]),
                  entity(3, "sky", "blue sky covering the top", None)],
        attributes=[], relations=[], global_items=["one object"],
    )
    plain = build_caption_writer("concat")(content, None, (100, 100))
    assert plain == "A red circle left of the star. Blue sky covering the top."
    boxed = build_caption_writer("concat_boxes")(content, None, (100, 100))
    assert boxed == (
        "A red circle left of the star [[0.100, 0.200, 0.300, 0.400]]. Blue sky covering the top."
    )



def test_shipped_shapes_lm_writes_only_listed_boxes():
    """The LM in model_zoo loads offline and, under the box constraint, states only the
    boxes of the entities it was given."""
    writer = build_caption_writer("small_lm", model_path=SHIPPED_LM, max_new_tokens=160)
    assert writer.prompt_format == PromptFormat(
        include_dense_captions=True, region_boxes=True, ground_region_captions=True
    )
    assert writer.constrain_boxes
    from pix2cap.bridge.copy_lm import CopyGPT2LMHeadModel

    assert isinstance(writer.model, CopyGPT2LMHeadModel)
    stages, content = _prepared()
    caption = writer(content, stages, (H, W))
    stated = {tuple(b["box"]) for b in parse_pancap_boxes(caption)}
    listed = {
        tuple(parse_pancap_boxes(grid_text_to_pancap(format_grid_box(e.grid_box), W, H))[0]["box"])
        for e in content.entities
    }
    assert stated and stated <= listed


def test_prompt_format_round_trips_through_its_file(tmp_path):
    fmt = PromptFormat(include_dense_captions=True, region_boxes=False, ground_region_captions=True)
    path = fmt.save(str(tmp_path))
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["kind"] == "pix2cap_prompt_format" and saved["version"] == 1
    assert PromptFormat.load(str(tmp_path)) == fmt
    assert PromptFormat.from_dict(fmt.to_dict()) == fmt
    with pytest.raises(FileNotFoundError, match="pix2cap_prompt_format.json"):
        PromptFormat.load(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 2}, "unknown prompt format"),
        ({"kind": "other"}, "unknown prompt format"),
        ({"region_captions_first": True}, "unknown keys"),
        ({"region_boxes": "yes"}, "true or false"),
    ],
)
def test_writer_refuses_an_lm_whose_prompt_format_it_does_not_know(tmp_path, change, message):
    lm = tmp_path / "lm"
    shutil.copytree(SHIPPED_LM, lm)
    fmt_file = lm / "pix2cap_prompt_format.json"
    data = json.loads(fmt_file.read_text())
    data.update(change)
    fmt_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as error:
        build_caption_writer("small_lm", model_path=str(lm))
    assert str(fmt_file) in str(error.value)
    # A small LM folder without a prompt format is refused too.
    fmt_file.unlink()
    with pytest.raises(FileNotFoundError, match="pix2cap_prompt_format.json"):
        build_caption_writer("small_lm", model_path=str(lm))


def _old_lr_at(step, steps, lr, warmup):
    """The warm-up + cosine formula the LM training used before it ran on the solver's
    schedulers."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@pytest.mark.parametrize("steps", [1, 2, 10, 21, 1200, 1500])
@pytest.mark.parametrize("lr", [2e-3, 2e-4])
def test_lm_training_lr_follows_the_old_formula(steps, lr):
    warmup = max(1, steps // 20)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=lr)
    scheduler = LRMultiplier(optimizer, warmup_cosine_schedule(steps, warmup), max_iter=steps)
    for step in range(steps):
        got, expected = optimizer.param_groups[0]["lr"], _old_lr_at(step, steps, lr, warmup)
        # Equal up to float64 rounding (a few units in the last place), hence the same in
        # the float32 arithmetic of the parameters.
        assert got == pytest.approx(expected, rel=1e-13, abs=0.0), step
        assert np.float32(got) == np.float32(expected), step
        optimizer.step()
        scheduler.step()
