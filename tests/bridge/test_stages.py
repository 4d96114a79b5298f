import numpy as np
import pytest

from pix2cap.bridge.stages import (
    STAGE1_PROMPT,
    STAGE2_PROMPT,
    STAGE3_PROMPT,
    STAGE4_PROMPT,
    StageItem,
    build_stages,
    clean_tag,
    grid_box_to_normalized,
    grid_box_to_pixel,
    grid_text_to_pancap,
    normalized_box_to_grid,
    pancap_text_to_grid,
    parse_stage_items,
    pixel_box_to_grid,
)


def test_prompts_verbatim():
    assert STAGE1_PROMPT == "Please localize all entities in this image."
    assert STAGE2_PROMPT.format("X") == (
        "Please specify the semantic tags of all entities based on their bounding boxes: X"
    )
    assert STAGE3_PROMPT.format("X") == (
        "Please specify missing entities and their locations for this image based on these "
        "specified entities: X"
    )
    assert STAGE4_PROMPT.format("X") == (
        "Please provide a hyper-detailed description for this image, including all entities, "
        "their locations, attributes, and relationships, as well as the global image status, "
        "based on boxes and tags: X"
    )


def test_pixel_box_to_grid_pads_short_axis_in_the_middle():
    # 200 wide x 100 high: side 200, 50 px of padding above and below.
    assert pixel_box_to_grid([0, 0, 200, 100], 200, 100) == [0, 250, 999, 750]
    assert pixel_box_to_grid([50, 20, 150, 80], 200, 100) == [250, 350, 750, 650]
    # Portrait: 100 wide x 200 high, padding left and right.
    assert pixel_box_to_grid([0, 0, 100, 200], 100, 200) == [250, 0, 750, 999]
    # Square: no padding; 0.5-steps round half up.
    assert pixel_box_to_grid([1, 1, 3, 3], 4000, 4000) == [0, 0, 1, 1]


def test_grid_and_pixel_inverse():
    box = [250, 350, 750, 650]
    assert grid_box_to_pixel(box, 200, 100) == [50.0, 20.0, 150.0, 80.0]
    assert grid_box_to_normalized(box, 200, 100) == [0.25, 0.2, 0.75, 0.8]


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (333, 1000), (512, 512), (1500, 999)])
def test_round_trips(size):
    width, height = size
    rng = np.random.default_rng(width * 7 + height)
    side = max(width, height)
    for _ in range(200):
        # grid -> normalised -> grid is exact for boxes inside the image.
        x = np.sort(rng.uniform(0, width, 2))
        y = np.sort(rng.uniform(0, height, 2))
        grid = pixel_box_to_grid([x[0], y[0], x[1], y[1]], width, height)
        norm = grid_box_to_normalized(grid, width, height)
        assert all(round(v, 3) == v for v in norm)
        assert normalized_box_to_grid(norm, width, height) == grid
        # normalised (3 decimals) -> grid -> normalised: within half a grid step (+ rounding).
        n = [round(float(v), 3) for v in (x[0] / width, y[0] / height, x[1] / width, y[1] / height)]
        back = grid_box_to_normalized(normalized_box_to_grid(n, width, height), width, height)
        tol = [0.5 * side / 1000 / width + 5e-4, 0.5 * side / 1000 / height + 5e-4] * 2
        assert all(abs(a - b) <= t + 1e-9 for a, b, t in zip(back, n, tol))


def test_square_image_round_trip_is_exact():
    for box in ([0.307, 0.213, 0.743, 0.886], [0.0, 0.0, 0.5, 0.999]):
        grid = normalized_box_to_grid(box, 800, 800)
        assert grid_box_to_normalized(grid, 800, 800) == box
    # The grid stops at 999 ([0, 1000) as PancapChain writes it).
    assert normalized_box_to_grid([0, 0, 1, 1], 800, 800) == [0, 0, 999, 999]


def test_clean_tag():
    assert clean_tag("wall-other-merged") == "wall"
    assert clean_tag("tree-merged") == "tree"
    assert clean_tag("dining table") == "dining table"
    assert clean_tag("a, b;c") == "a b c"


def test_stage_texts_match_protocol_to_the_character():
    items = [
        StageItem("person", (100, 200, 500, 600)),
        StageItem("dog", (10, 20, 30, 40)),
        StageItem("person", (100, 200, 500, 600)),  # duplicate tag + box: dropped
        StageItem("cat", (100, 200, 500, 600)),  # same box, other tag: kept in stage 2
    ]
    extra = [
        StageItem("dog", (10, 20, 30, 40)),  # repeats an item: dropped
        StageItem("ball", (1, 2, 3, 4)),
        StageItem("ball", (1, 2, 3, 4)),
    ]
    stages = build_stages(items, extra)
    assert stages.stage1 == (
        "<box>[[100, 200, 500, 600]]</box>, <box>[[10, 20, 30, 40]]</box>"
    )
    assert stages.stage2 == (
        "person <box>[[100, 200, 500, 600]]</box>, dog <box>[[10, 20, 30, 40]]</box>, "
        "cat <box>[[100, 200, 500, 600]]</box>"
    )
    assert stages.stage3_extra == "ball <box>[[1, 2, 3, 4]]</box>"
    assert stages.stage3 == stages.stage2 + ", ball <box>[[1, 2, 3, 4]]</box>"
    assert stages.prompts[1] == STAGE1_PROMPT
    assert stages.prompts[2] == STAGE2_PROMPT.format(stages.stage1)
    assert stages.prompts[3] == STAGE3_PROMPT.format(stages.stage2)
    assert stages.prompts[4] == STAGE4_PROMPT.format(stages.stage3)
    assert stages.as_dict() == {1: stages.stage1, 2: stages.stage2, 3: stages.stage3, 4: stages.prompts[4]}


def test_stage3_none_when_nothing_is_added():
    items = [StageItem("dog", (10, 20, 30, 40))]
    for extra in ([], [StageItem("dog", (10, 20, 30, 40))]):
        stages = build_stages(items, extra)
        assert stages.stage3_extra == "None"
        assert stages.stage3 == "dog <box>[[10, 20, 30, 40]]</box>"
        assert stages.prompts[4].endswith("based on boxes and tags: dog <box>[[10, 20, 30, 40]]</box>")


def test_parse_stage_items_round_trip_and_none():
    stages = build_stages([StageItem("red car", (1, 2, 3, 4)), StageItem("sky", (0, 0, 999, 500))])
    assert parse_stage_items(stages.stage2) == [
        StageItem("red car", (1, 2, 3, 4)),
        StageItem("sky", (0, 0, 999, 500)),
    ]
    assert [i.box for i in parse_stage_items(stages.stage1)] == [(1, 2, 3, 4), (0, 0, 999, 500)]
    assert parse_stage_items("None") == []
    assert parse_stage_items("None, there are no missing entities") == []


def test_text_box_conversions():
    width, height = 200, 100
    text = "A dog <box>[[250, 350, 750, 650]]</box> sits; a ball < box > [ [ 0, 250, 999, 750 ] ] < / box >."
    assert grid_text_to_pancap(text, width, height) == (
        "A dog [[0.250, 0.200, 0.750, 0.800]] sits; a ball [[0.000, 0.000, 0.999, 1.000]]."
    )
    # Already-normalised boxes stay as they are.
    plain = "The woman [[0.307, 0.213, 0.743, 0.886]] stands."
    assert grid_text_to_pancap(plain, width, height) == plain
    grid_text = pancap_text_to_grid("A dog [[0.25, 0.2, 0.75, 0.8]] sits.", width, height)
    assert grid_text == "A dog <box>[[250, 350, 750, 650]]</box> sits."
    assert grid_text_to_pancap(grid_text, width, height) == "A dog [[0.250, 0.200, 0.750, 0.800]] sits."


def test_bad_input_errors():
    with pytest.raises(ValueError, match="4 numbers"):
        pixel_box_to_grid([1, 2, 3], 10, 10)
    with pytest.raises(ValueError, match="positive"):
        pixel_box_to_grid([1, 2, 3, 4], 0, 10)
