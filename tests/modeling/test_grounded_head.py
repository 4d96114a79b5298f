"""The grounded caption head (PGC) and its place in Pix2Cap: markup tokens, targets, losses,
SEG masks tied to panoptic segments."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from pix2cap.data.caption_formats import (
    grounded_to_markup,
    markup_to_grounded,
    parse_grounded_caption,
)
from pix2cap.modeling.caption_head import (
    GroundedCaptionHead,
    GroundedMarkupCodec,
    build_caption_tokenizer,
)
from pix2cap.modeling.meta_arch.pix2cap import Pix2Cap
from pix2cap.structures import ImageList
from tests.data.test_mapper import _make_dict, _mapper
from tests.modeling.test_pix2cap import NUM_CLASSES, make_input, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES_VOCAB = os.path.join(REPO, "configs", "shapes", "shapes_vocab.txt")
MAX_GROUNDED = 48


def tiny_grounded_head(codec, **kwargs):
    """A tiny grounded caption head for ``codec``'s vocabulary."""
    return GroundedCaptionHead(
        query_dim=32,
        global_dim=32,
        mask_dim=32,
        num_classes=NUM_CLASSES,
        seg_token_ids=codec.seg_token_ids,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        intermediate_size=64,
        max_length=MAX_GROUNDED,
        num_points=64,
        **codec.vocab_kwargs(),
        **kwargs,
    )


def grounded_model(seed=0, copy_captions=False, **overrides):
    """The tiny Pix2Cap of test_pix2cap with a tiny grounded caption head."""
    torch.manual_seed(seed)
    codec = GroundedMarkupCodec(build_caption_tokenizer())
    head = tiny_grounded_head(codec, copy_captions=copy_captions, max_slot_caption_length=12)
    overrides.setdefault("grounded_max_length", MAX_GROUNDED)
    return tiny_model(seed=seed, grounded_head=head, **overrides)


def grounded_input(h=64, w=64, seed=0, caption=None):
    """test_pix2cap's input (things 1, 2 and stuff 3) with a grounded caption naming both
    things in one phrase, each thing alone, the stuff, and a segment not in the image."""
    x = make_input(h, w, torch.Generator().manual_seed(seed))
    x["instances"].gt_segment_ids = torch.tensor([1, 2, 3])
    raw = caption or (
        "<1,2:Two shapes> lie on <3:green grass>. <1:A red circle> is above "
        "<2:a blue square>. <9:A bird> flew away."
    )
    x["grounded_caption"] = parse_grounded_caption(raw, [1, 2, 3, 9])
    return x


# ---------------------------------------------------------------------------------------------
# Markup tokens
# ---------------------------------------------------------------------------------------------
def test_markup_tokens_take_unused_slots_or_new_ids():
    full = GroundedMarkupCodec(build_caption_tokenizer())
    vocab = full.tokenizer.get_vocab()
    assert full.vocab_size == len(full.tokenizer) == 30522
    assert list(full.markup_ids.values()) == [vocab[f"[unused{i}]"] for i in range(4)]
    shapes = GroundedMarkupCodec(build_caption_tokenizer(SHAPES_VOCAB))
    base = len(shapes.tokenizer)
    assert shapes.vocab_size == base + 4
    assert list(shapes.markup_ids.values()) == [base, base + 1, base + 2, base + 3]
    assert shapes.seg_token_ids == (base + 2, base + 3)


def test_markup_round_trip_coconut_tags_to_targets_to_output():
    """COCONut tags -> <p>..</p> [SEG] targets -> token ids -> decoded output -> <ids:phrase>."""
    raw = "<6,7,8:Eight boys> play on <2:a grassy field>, near <4:a large zebu>."
    parsed = parse_grounded_caption(raw, [2, 4, 6, 7, 8])
    markup, segs = grounded_to_markup(parsed)
    assert markup == (
        "<p> Eight boys </p> [SEG] play on <p> a grassy field </p> [SEG], near "
        "<p> a large zebu </p> [SEG]."
    )
    assert segs == [[6, 7, 8], [2], [4]]
    codec = GroundedMarkupCodec(build_caption_tokenizer())
    ids = codec.encode([markup], 40)
    assert ids.shape == (1, 40)
    seg_id = codec.markup_ids["[SEG]"]
    assert int((ids == seg_id).sum()) == 3
    assert codec.count_tokens(markup) == int((ids != 0).sum())
    decoded = codec.decode(ids)[0]
    out = markup_to_grounded(decoded, [[16, 17, 18], [12], [14]])
    assert out["text"] == "eight boys play on a grassy field, near a large zebu."
    assert out["tagged"] == "<16,17,18:eight boys> play on <12:a grassy field>, near <14:a large zebu>."
    for phrase in out["phrases"]:
        assert out["text"][phrase["start"] : phrase["end"]] == phrase["phrase"]


def test_encode_cuts_keeping_sep():
    codec = GroundedMarkupCodec(build_caption_tokenizer())
    ids = codec.encode(["<p> a dog </p> [SEG] runs on the grass near the red house"], 6)
    tok = codec.tokenizer
    assert ids[0, 0] == tok.cls_token_id and ids[0, -1] == tok.sep_token_id
    assert ids[0, 4] == codec.markup_ids["</p>"]


# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
def _targets(model, inputs):
    images = [model._normalize(x["image"]) for x in inputs]
    image_list = ImageList.from_tensors(images, model.size_divisibility)
    return model.prepare_grounded_targets(inputs, image_list)


def test_targets_multi_segment_cropped_and_stuff_phrases():
    model = grounded_model()
    x = grounded_input()
    tokens, slot_rows, seg_slots, seg_masks, seg_valid = _targets(model, [x])
    codec = model.grounded_codec
    thing_seg, stuff_seg = codec.seg_token_ids
    kinds = [t for t in tokens[0].tolist() if t in (thing_seg, stuff_seg)]
    # "two shapes" (1, 2), "green grass" (3, stuff), "a red circle" (1), "a blue square" (2),
    # "a bird" (9: not in the image, cropped away).
    assert kinds == [thing_seg, stuff_seg, thing_seg, thing_seg, thing_seg]
    # Stuff 3 (row 2) first; then 1, the only thing opening a sentence alone; then 2.
    assert slot_rows[0].tolist() == [2, 0, 1]
    assert seg_slots[0].int().tolist() == [[0, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]
    masks = x["instances"].gt_masks
    assert seg_valid[0].tolist() == [True, True, True, True, False]
    assert torch.equal(seg_masks[0][0, :64, :64], masks[0] | masks[1])
    assert torch.equal(seg_masks[0][1, :64, :64], masks[2])
    assert torch.equal(seg_masks[0][2, :64, :64], masks[0])
    assert not seg_masks[0][4].any()
    # The cropped phrase keeps its words.
    text = codec.decode(tokens)[0]
    assert "<p> a bird </p> [SEG] flew away." in text


def test_slots_follow_the_order_the_caption_describes_segments():
    model = grounded_model()
    x = grounded_input(caption="<3:Grass> lies under <2:a blue square>.")
    _, slot_rows, seg_slots, _, _ = _targets(model, [x])
    # Segment 3 (row 2) first, then 2 (row 1), then the unnamed 1 (row 0).
    assert slot_rows[0].tolist() == [2, 1, 0]
    assert seg_slots[0].int().tolist() == [[1, 0, 0], [0, 1, 0]]
    # Things go in the order they are described (open a sentence), not first named: 2 is
    # named first, as a relation target, but 1 is described first.
    x = grounded_input(
        caption="<3:Grass> lies under <2:a blue square>. <1:A red circle> is above "
        "<2:the square>. <2:A blue square> is small."
    )
    _, slot_rows, seg_slots, _, _ = _targets(model, [x])
    assert slot_rows[0].tolist() == [2, 0, 1]
    assert seg_slots[0].int().tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
    # A crowd segment is no slot (nor a target of prepare_targets).
    x["instances"].gt_iscrowd = torch.tensor([True, False, False])
    _, slot_rows, seg_slots, _, _ = _targets(model, [x])
    assert slot_rows[0].tolist() == [1, 0]


def test_targets_cut_at_a_sentence_end():
    model = grounded_model(grounded_max_length=24)
    x = grounded_input()
    tokens, _, _, seg_masks, _ = _targets(model, [x])
    text = model.grounded_codec.decode(tokens)[0]
    # The first sentence is 15 tokens, the first two 29: the cut falls after the first.
    assert text == "<p> two shapes </p> [SEG] lie on <p> green grass </p> [SEG_STUFF] ."
    assert int((tokens != 0).sum()) == 15
    assert seg_masks[0].shape[0] == 2


def test_image_without_grounded_caption_is_all_padding():
    model = grounded_model()
    x, y = grounded_input(), grounded_input(seed=1)
    y["grounded_caption"] = None
    tokens, slot_rows, seg_slots, seg_masks, seg_valid = _targets(model, [x, y])
    assert int((tokens[1] != 0).sum()) == 0
    assert seg_masks[1].shape[0] == 0 and seg_valid[1].numel() == 0
    assert seg_slots[1].shape == (0, 3) and slot_rows[1].tolist() == [0, 1, 2]


def test_flip_mirrors_phrase_words_and_masks(tmp_path):
    """A flipped training image: the phrase says "right" and its target mask is mirrored."""
    d = _make_dict(tmp_path)
    model = grounded_model()
    plain = _mapper(flip_prob=0.0)(d)
    flipped = _mapper(flip_prob=1.0)(d)
    tokens_p, _, _, masks_p, _ = _targets(model, [plain])
    tokens_f, _, _, masks_f, _ = _targets(model, [flipped])
    codec = model.grounded_codec
    assert codec.decode(tokens_p)[0].startswith("<p> the dog on the left </p> [SEG]")
    assert codec.decode(tokens_f)[0].startswith("<p> the dog on the right </p> [SEG]")
    # Both images are 32 wide (the mapper's crop), so mirroring is a flip of the grid.
    assert masks_p[0].shape == masks_f[0].shape and masks_p[0].shape[0] == 2
    assert masks_p[0][0].any()
    assert torch.equal(masks_f[0], masks_p[0].flip(-1))


# ---------------------------------------------------------------------------------------------
# Losses and inference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("copy_captions", [False, True])
def test_grounded_losses_fall_in_a_few_steps(copy_captions):
    model = grounded_model(copy_captions=copy_captions)
    model.train()
    batch = [grounded_input(seed=0), grounded_input(seed=1)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-3)
    keys = (
        "loss_grounded_caption",
        "loss_grounded_select",
        "loss_grounded_mask",
        "loss_grounded_dice",
    )
    history = []
    torch.manual_seed(0)
    for _ in range(40):
        losses = model(batch)
        assert set(keys) <= set(losses)
        history.append({k: float(losses[k].detach()) for k in keys})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for key in keys:
        first = sum(h[key] for h in history[:3]) / 3
        last = sum(h[key] for h in history[-3:]) / 3
        assert last < 0.6 * first, (key, first, last)


@pytest.mark.parametrize("copy_captions", [False, True])
def test_eval_output_references_panoptic_segments(copy_captions, monkeypatch):
    # Thresholds of 0 keep a segment even from the untrained decoder.
    model = grounded_model(
        grounded_phrase_masks=True,
        copy_captions=copy_captions,
        object_mask_threshold=0.0,
        overlap_threshold=0.0,
    )
    model.eval()
    # An untrained head writes no markup: have it write two grounded phrases (the SEG states,
    # selections, ties and masks after that are the head's own).
    codec = model.grounded_codec
    written = codec.encode(["<p> a red circle </p> [SEG] lies on <p> grass </p> [SEG_STUFF]."], 16)
    head = model.grounded_head

    def generate(memory, memory_valid=None, **kwargs):
        tokens = written.expand(memory.shape[0], -1)
        return tokens, torch.zeros(memory.shape[0])

    monkeypatch.setattr(head, "generate_from_memory", generate)
    with torch.no_grad():
        out = model([{"image": grounded_input()["image"], "height": 64, "width": 64}])[0]
    grounded = out["grounded_caption"]
    assert grounded["text"] == "a red circle lies on grass."
    panoptic_seg, segments_info = out["panoptic_seg"]
    ids = {s["id"] for s in segments_info}
    assert [p["phrase"] for p in grounded["phrases"]] == ["a red circle", "grass"]
    stuff = {s["id"] for s in segments_info if not s["isthing"]}
    assert stuff  # the kept segment of this seed is stuff
    # Every SEG is tied to at least one kept segment, of its kind where there is one.
    assert all(p["segment_ids"] for p in grounded["phrases"])
    assert set(grounded["phrases"][1]["segment_ids"]) <= stuff
    tags = [",".join(map(str, p["segment_ids"])) for p in grounded["phrases"]]
    assert grounded["tagged"] == f"<{tags[0]}:a red circle> lies on <{tags[1]}:grass>."
    for phrase in grounded["phrases"]:
        assert set(phrase) == {"phrase", "start", "end", "segment_ids", "score"}
        assert grounded["text"][phrase["start"] : phrase["end"]] == phrase["phrase"]
        assert set(phrase["segment_ids"]) <= ids
    masks = out["grounded_phrase_masks"]
    assert masks.dtype == torch.bool and masks.shape == (len(grounded["phrases"]), 64, 64)
    for phrase, mask in zip(grounded["phrases"], masks):
        union = torch.isin(panoptic_seg, torch.tensor(phrase["segment_ids"], dtype=torch.int32))
        assert torch.equal(mask, union)


def test_grounded_caption_for_a_large_original(monkeypatch):
    # The slots are read from the merge at the inference resolution, so the grounded caption
    # does not depend on the original's size; the phrase masks are made at that size.
    model = grounded_model(
        grounded_phrase_masks=True, object_mask_threshold=0.0, overlap_threshold=0.0
    )
    model.eval()
    written = model.grounded_codec.encode(
        ["<p> a red circle </p> [SEG] lies on <p> grass </p> [SEG_STUFF]."], 16
    )

    def generate(memory, memory_valid=None, **kwargs):
        return written.expand(memory.shape[0], -1), torch.zeros(memory.shape[0])

    monkeypatch.setattr(model.grounded_head, "generate_from_memory", generate)
    image = grounded_input()["image"]
    with torch.no_grad():
        native = model([{"image": image}])[0]
        big = model([{"image": image, "height": 160, "width": 208}])[0]
    assert big["grounded_caption"] == native["grounded_caption"]
    panoptic_seg = big["panoptic_seg"][0]
    assert panoptic_seg.shape == (160, 208)
    masks = big["grounded_phrase_masks"]
    phrases = big["grounded_caption"]["phrases"]
    assert masks.shape == (len(phrases), 160, 208) and len(phrases) == 2
    for phrase, mask in zip(phrases, masks):
        union = torch.isin(panoptic_seg, torch.tensor(phrase["segment_ids"], dtype=torch.int32))
        assert mask.any() and torch.equal(mask, union)


def test_copy_mix_is_a_distribution_over_the_vocabulary():
    head = tiny_grounded_head(
        GroundedMarkupCodec(build_caption_tokenizer()), copy_captions=True, max_slot_caption_length=12
    )
    torch.manual_seed(0)
    hidden, memory = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    copy_ids = torch.tensor([[-1, 2003, 2417, -1, 2003], [-1, -1, -1, -1, -1]])
    probs = head.copy_log_probs(hidden, memory, copy_ids).exp()
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3), atol=1e-4)  # + 1e-9 per word
    # With the gate shut, all mass is on the copyable words of the row.
    torch.nn.init.constant_(head.copy_gate.bias, -50.0)
    probs = head.copy_log_probs(hidden, memory, copy_ids).exp()
    assert torch.allclose(probs[0][:, [2003, 2417]].sum(-1), torch.ones(3), atol=1e-4)
    # Nothing to copy in row 1: the vocabulary distribution alone.
    vocab = head.lm_logits(hidden[1]).softmax(-1)
    assert torch.allclose(probs[1], vocab, atol=1e-6)


@pytest.mark.parametrize("source, expected", [(7, {4: 1}), (8, {})])
def test_a_phrase_copied_from_a_captions_subject_is_that_slots(source, expected):
    """Memory: global, 2 slots, 2 captions of 3 tokens ([CLS] w1 w2): slot 1's caption starts
    at 6, its first word at 7. A one-word phrase copied from 7 belongs to slot 1; one copied
    from 8 (mid-caption: a relation target) keeps its SEG's selection."""
    codec = GroundedMarkupCodec(build_caption_tokenizer())
    head = tiny_grounded_head(
        codec,
        copy_captions=True,
        max_slot_caption_length=12,
        phrase_open_token_id=codec.markup_ids["<p>"],
    )
    with torch.no_grad():
        for linear in (head.copy_query, head.copy_key):
            linear.weight.copy_(torch.eye(32))
            linear.bias.zero_()
        head.copy_gate.bias.fill_(-50.0)  # everything copied
    state = torch.ones(32)
    states = state.expand(1, 6, 32).clone()
    memory = torch.zeros(1, 9, 32)
    memory[0, source] = 10.0  # the one key the (constant) query matches
    copy_ids = torch.tensor([[-1, -1, -1, -1, 2003, 2417, -1, 2003, 2417]])
    p_open, p_close = codec.markup_ids["<p>"], codec.markup_ids["</p>"]
    seg = codec.markup_ids["[SEG]"]
    tokens = torch.tensor([[101, p_open, 2003, p_close, seg, 102]])
    found = head._copied_subjects(tokens, states, memory, copy_ids, [2])[0]
    assert {position: slot for position, (slot, _) in found.items()} == expected
    for _, share in found.values():
        assert share == pytest.approx(1.0)


def test_unmarked_mentions_are_tied_in_the_order_of_their_segs():
    slots = [
        {"id": 7, "category_id": 6, "score": 0.99, "caption": "green grass covering the bottom"},
        {"id": 1, "category_id": 2, "score": 0.8, "caption": "a white triangle on the grass"},
    ]
    names = ["circle", "square", "triangle", "star", "sky", "wall", "grass"]
    markup = "<p> a white triangle </p> [SEG] is on the grass near <p> x </p> [SEG] ."
    ties = [[(1, 0.9)], [(7, 0.4)]]
    out, new_ties = Pix2Cap._mention_ties(markup, ties, slots, names)
    assert out == (
        "<p> a white triangle </p> [SEG] is on <p> the grass </p> [SEG] near <p> x </p> [SEG] ."
    )
    assert new_ties == [[(1, 0.9)], [(7, pytest.approx(0.99))], [(7, 0.4)]]
    # The class name is a second name: the segment the panoptic head calls a square.
    out, new_ties = Pix2Cap._mention_ties("near the white square", [], slots, names)
    assert out == "near the white square"  # slot 1 is a triangle by class and caption
    slots[1]["category_id"] = 1
    out, new_ties = Pix2Cap._mention_ties("near the white square", [], slots, names)
    assert out == "near <p> the white square </p> [SEG]" and new_ties == [[(1, pytest.approx(0.8))]]


def test_slot_caption_summaries_pool_each_slots_own_words():
    """Memory: global, 2 slots, 2 captions of 3 tokens; slot 1 has no caption words."""
    head = tiny_grounded_head(
        GroundedMarkupCodec(build_caption_tokenizer()), copy_captions=True, max_slot_caption_length=12
    )
    torch.nn.init.zeros_(head.caption_pool.weight)  # uniform pooling
    memory = torch.randn(1, 9, 32)
    valid = torch.tensor([[True, True, True, True, True, False, False, False, False]])
    summaries = head.slot_caption_summaries(memory, valid, num_slots=2)
    assert len(summaries) == 1 and summaries[0].shape == (2, 32)
    assert torch.allclose(summaries[0][0], memory[0, 3:5].mean(0), atol=1e-6)
    assert torch.equal(summaries[0][1], torch.zeros(32))
    # They change the selection of slot 0 only.
    seg, slots = torch.randn(1, 32), memory[0, 1:3]
    change = head.seg_selection(seg, slots, summaries[0]) - head.seg_selection(seg, slots)
    bias = head.seg_query(seg) @ head.seg_caption_key.bias[:, None] / 32**0.5
    assert not torch.allclose(change[0, 0], bias[0, 0])
    assert torch.allclose(change[0, 1], bias[0, 0], atol=1e-5)  # zeros: the key's bias alone
    assert head.slot_caption_summaries(memory[:, :3], valid[:, :3], num_slots=2) is None


def test_seg_selections_tie_to_segments_of_their_kind():
    model = grounded_model()
    slots = [
        {"id": 7, "isthing": False},
        {"id": 1, "isthing": True},
        {"id": 2, "isthing": True},
    ]
    both = torch.tensor([0.1, 0.9, 0.6])
    assert model._tie_segments(both, slots, stuff=False) == [(1, pytest.approx(0.9)), (2, pytest.approx(0.6))]
    # Nothing reaches the threshold: the most selected slot of the SEG's kind.
    weak = torch.tensor([0.3, 0.2, 0.1])
    assert model._tie_segments(weak, slots, stuff=False) == [(1, pytest.approx(0.2))]
    assert model._tie_segments(weak, slots, stuff=True) == [(7, pytest.approx(0.3))]
    # An image without stuff: a [SEG_STUFF] may tie to a thing.
    assert model._tie_segments(weak[1:], slots[1:], stuff=True) == [(1, pytest.approx(0.2))]
    assert model._tie_segments(torch.zeros(0), [], stuff=False) == []


def test_learned_selections_are_checked_against_the_segments_captions():
    """A learned SEG selection that its phrase does not describe moves to a segment it does;
    one copied from a segment's caption, or naming nothing decoded, is kept or dropped."""
    slots = [
        {"id": 7, "caption": "green grass covering the bottom of the image"},
        {"id": 1, "caption": "a large white solid circle below the green star"},
        {"id": 2, "caption": "a small green dotted star to the left of the white circle"},
    ]
    markup = (
        "<p> a large white solid circle </p> [SEG] is below <p> the green star </p> [SEG] on "
        "<p> the grass </p> [SEG_STUFF] near <p> the red square </p> [SEG]."
    )
    selection = torch.tensor(
        [[0.0, 0.9, 0.0], [0.0, 0.8, 0.4], [0.7, 0.0, 0.0], [0.0, 0.6, 0.0]]
    )
    ties = [[(1, 0.9)], [(1, 0.8)], [(7, 0.7)], [(1, 0.6)]]
    copied = torch.tensor([True, False, False, False])
    out = Pix2Cap._agreeing_ties(markup, ties, selection, copied, slots)
    assert out[0] == [(1, 0.9)]  # copied: kept
    assert out[1] == [(2, pytest.approx(0.4))]  # "the green star" is segment 2, not the circle
    assert out[2] == [(7, pytest.approx(0.7))]  # agrees
    assert out[3] == [(1, pytest.approx(0.6))]  # "square" heads no caption: cannot be judged, kept
    selection[1] = torch.tensor([0.0, 0.8, 0.0])
    markup = markup.replace("the green star", "the yellow star")
    out = Pix2Cap._agreeing_ties(markup, ties, selection, copied, slots)
    assert out[1] == []  # no yellow star was decoded: ungrounded


def test_slot_order_is_stuff_top_down_then_things_left_to_right():
    seg = torch.zeros(8, 8, dtype=torch.int32)
    seg[4:] = 5  # stuff, bottom
    seg[:4] = 6  # stuff, top
    seg[1:3, 5:7] = 1  # thing, right
    seg[5:7, 1:3] = 2  # thing, left
    infos = [
        {"id": 5, "isthing": False},
        {"id": 1, "isthing": True},
        {"id": 6, "isthing": False},
        {"id": 2, "isthing": True},
    ]
    ids = torch.tensor([i["id"] for i in infos])
    masks = seg[None] == ids[:, None, None]
    order = grounded_model()._slot_order(masks, infos)
    assert [infos[k]["id"] for k in order] == [6, 5, 2, 1]


def test_mismatched_grounded_vocabulary_is_refused():
    head = tiny_grounded_head(GroundedMarkupCodec(build_caption_tokenizer(SHAPES_VOCAB)))
    # The tiny model's caption tokenizer is the full vocabulary; this head was sized for the
    # shapes one.
    with pytest.raises(ValueError, match="grounded head"):
        tiny_model(
            grounded_head=head,
            grounded_max_length=MAX_GROUNDED,
            tokenizer=build_caption_tokenizer(),
        )
    model = tiny_model(grounded_head=head, grounded_max_length=MAX_GROUNDED)
    with pytest.raises(ValueError, match="grounded head"):
        model.grounded_codec


def test_coconut_pancap_config():
    """configs/coco/pancap_focalnet_large.yaml: the paper setup plus a full-size grounded head
    over the full vocabulary (markup in [unused0-3]) and room for 200-word captions."""
    from pix2cap.config import get_cfg

    cfg = get_cfg()
    cfg.merge_from_file(os.path.join(REPO, "configs", "coco", "pancap_focalnet_large.yaml"))
    assert cfg.DATASETS.TRAIN == ("coconut_pancap_train",)
    assert cfg.DATASETS.TEST == ("coconut_pancap_val",)
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 200
    head_cfg = cfg.MODEL.GROUNDED_HEAD
    assert head_cfg.ENABLED and head_cfg.MAX_LENGTH >= 400
    steps = [s / cfg.SOLVER.MAX_ITER for s in cfg.SOLVER.STEPS]
    assert steps == pytest.approx([0.889, 0.963], abs=1e-3)
    with torch.device("meta"):  # shapes only: no memory for the 100M parameters
        head = GroundedCaptionHead(cfg)
    assert head.vocab_size == 30522 and head.max_length == head_cfg.MAX_LENGTH
    assert len(head.layers) == 6
    vocab = build_caption_tokenizer().get_vocab()
    kwargs = GroundedCaptionHead.from_config(cfg)
    assert list(kwargs["seg_token_ids"]) == [vocab["[unused2]"], vocab["[unused3]"]]
