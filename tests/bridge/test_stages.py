from pix2cap.bridge.stages import (
    STAGE1_PROMPT,
    STAGE2_PROMPT,
    STAGE3_PROMPT,
    STAGE4_PROMPT,
    StageItem,
    build_stages,
    clean_tag,
    parse_stage_items,
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
