"""PancapChain's prediction folders, read by the authors' aggregation rules."""

import json

import pytest
from PIL import Image

from pix2cap.data.errors import DatasetError
from pix2cap.evaluation.pancapscore.pancapchain import (
    pancapchain_box_to_normalized,
    pancapchain_text_to_pancap,
    read_pancapchain_folder,
)


def test_grid_boxes_to_normalised_by_the_aggregation_rules():
    # 200 x 100: grid x 0.2 -> pixels of the 200 x 200 square; the pad is (200 - 100) // 2 = 50
    # rows above the image.
    assert pancapchain_box_to_normalized([0, 250, 1000, 750], 200, 100) == [0.0, 0.0, 1.0, 1.0]
    assert pancapchain_box_to_normalized([100, 300, 500, 600], 200, 100) == pytest.approx(
        [0.1, 0.1, 0.5, 0.7]
    )
    # 100 x 200: the pad is on the left.
    assert pancapchain_box_to_normalized([250, 0, 750, 1000], 100, 200) == [0.0, 0.0, 1.0, 1.0]
    # 201 x 100: the pad is the integer (201 - 100) // 2 = 50, not 50.5: the row 500 of the
    # grid is 100.5 px of the square, 50.5 px of the image: 0.505 (0.500 with the exact half).
    assert pancapchain_box_to_normalized([0, 500, 1000, 500], 201, 100)[1] == pytest.approx(0.505)
    # Outside the image: clamped.
    assert pancapchain_box_to_normalized([0, 0, 1000, 1000], 200, 100) == [0.0, 0.0, 1.0, 1.0]


def test_only_the_exact_box_form_is_rewritten():
    text = (
        "A dog <box>[[100, 300, 500, 600]]</box> near a cat <box>[[1,2,3,4]]</box> and "
        "<box>[[0.1, 0.2, 0.3, 0.4]]</box>."
    )
    assert pancapchain_text_to_pancap(text, 200, 100) == (
        "A dog [[0.100, 0.100, 0.500, 0.700]] near a cat <box>[[1,2,3,4]]</box> and "
        "<box>[[0.1, 0.2, 0.3, 0.4]]</box>."
    )


def test_read_a_prediction_folder(tmp_path):
    root = tmp_path / "data"
    (root / "sam").mkdir(parents=True)
    Image.new("RGB", (200, 100)).save(root / "sam" / "a.jpg")
    Image.new("RGB", (100, 200)).save(root / "sam" / "b.jpg")
    folder = tmp_path / "pred"
    folder.mkdir()
    (folder / "2.json").write_text(json.dumps({"image": "sam/b.jpg", "text": "x <box>[[250, 0, 750, 1000]]</box>"}))
    (folder / "1.json").write_text(json.dumps({"image": "sam/a.jpg", "text": "y <box>[[0, 250, 1000, 750]]</box>"}))
    (folder / "notes.txt").write_text("not a prediction")
    entries = read_pancapchain_folder(str(folder), str(root))
    assert entries == [
        {"image_path": "sam/a.jpg", "model_response": "y [[0.000, 0.000, 1.000, 1.000]]"},
        {"image_path": "sam/b.jpg", "model_response": "x [[0.000, 0.000, 1.000, 1.000]]"},
    ]
    (folder / "3.json").write_text(json.dumps({"image": "sam/missing.jpg", "text": ""}))
    with pytest.raises(DatasetError, match="3.json: its image .*missing.jpg cannot be opened"):
        read_pancapchain_folder(str(folder), str(root))
    (folder / "3.json").write_text(json.dumps({"text": "no image"}))
    with pytest.raises(DatasetError, match="3.json: a PancapChain prediction needs"):
        read_pancapchain_folder(str(folder), str(root))
