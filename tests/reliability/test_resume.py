"""Streaming, resumable outputs: a killed run continues without redoing finished images and
writes the same files as an uninterrupted one; failures of single images are counted."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pix2cap.data.datasets.shapes import generate_shapes
from pix2cap.data.errors import DatasetError
from pix2cap.utils.cli import OutputPathError
from pix2cap.utils.streaming import ImagesFailedError
from tests.tools.test_demo import _FakePanopticCaptioner, setup  # noqa: F401  (the fixture)
from tests.tools.test_pancap_infer import FakePredictor, _load_tool, _write_images

from .conftest import SHAPES_CONFIG, SHAPES_WEIGHTS, TOOLS, assert_no_partial_output

FINAL_FILES = ("predictions.json", "structured.json", "predictions.jsonl")


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_killed_pancap_infer_continues_to_the_same_result(tmp_path, env):
    """The shipped shapes model and the template writer on 8 shapes images: a run killed
    (SIGKILL) after two images, then run again with the same command, writes the same files
    as a run that was never interrupted."""
    generate_shapes(str(tmp_path / "shapes"), "val", num_images=8, image_size=64, seed=3)
    images = tmp_path / "shapes" / "images" / "val"

    def command(out: Path) -> list:
        return [sys.executable, str(TOOLS / "pancap_infer.py"), "--config-file", str(SHAPES_CONFIG),
                "--input", str(images), "--writer", "template", "--output", str(out),
                "MODEL.WEIGHTS", str(SHAPES_WEIGHTS), "INPUT.MIN_SIZE_TEST", "64",
                "INPUT.MAX_SIZE_TEST", "64"]

    def run(out: Path) -> subprocess.CompletedProcess:
        result = subprocess.run(command(out), env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
        return result

    whole = tmp_path / "whole"
    run(whole)

    cut = tmp_path / "cut"
    process = subprocess.Popen(command(cut), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while _lines(cut / "predictions.jsonl") < 2 and process.poll() is None:
        assert time.monotonic() < deadline, "no two images done in time"
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    done = _lines(cut / "predictions.jsonl")
    assert 2 <= done < 8 and not (cut / "predictions.json").exists()
    assert json.loads((cut / "summary.json").read_text())["status"] == "running"
    # As if the kill had come in the middle of writing the next line.
    with open(cut / "predictions.jsonl", "a") as f:
        f.write('{"image_path": "' + str(images / "000007.png") + '", "model_resp')

    result = run(cut)
    assert f"{done} image(s) already done are skipped" in result.stdout
    for name in FINAL_FILES:
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name
    summary = json.loads((cut / "summary.json").read_text())
    assert (summary["status"], summary["images"], summary["done"], summary["resumed"]) == (
        "complete", 8, 8, done
    )
    assert len(json.loads((cut / "predictions.json").read_text())) == 8
    assert_no_partial_output(cut, whole)


class FlakyPredictor(FakePredictor):
    """Fails on the images whose pixels have the values in ``fail_values``."""

    def __init__(self, fail_values):
        super().__init__()
        self.fail_values = set(fail_values)

    def __call__(self, image):
        if int(image[0, 0, 0]) in self.fail_values:
            self.calls += 1
            raise RuntimeError("the model ran out of memory")
        return super().__call__(image)


def _infer(tool, tmp_path, *flags):
    return tool.get_parser().parse_args(
        ["--input", str(tmp_path / "images"), "--output", str(tmp_path / "out"), *flags]
    )


def test_pancap_infer_counts_a_failed_image_and_retries_only_it(tmp_path):
    tool = _load_tool()
    _write_images(tmp_path / "images", 3)  # pixel values 0, 40, 80
    out = tmp_path / "out"
    flaky = FlakyPredictor(fail_values={40})
    with pytest.raises(ImagesFailedError, match=r"1 of 3 image\(s\) failed .*img1.png: "
                       "RuntimeError: the model ran out of memory"):
        tool.main(_infer(tool, tmp_path), predictor=flaky)
    assert flaky.calls == 3
    written = json.loads((out / "predictions.json").read_text())
    assert [Path(p["image_path"]).name for p in written] == ["img0.png", "img2.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["done"], summary["failed"]) == ("incomplete", 2, 1)
    assert "Traceback" in (out / "log.txt").read_text()  # the failure's traceback is logged

    # The rerun does only the failed image and writes all three, in input order.
    healthy = FakePredictor()
    preds, _ = tool.main(_infer(tool, tmp_path), predictor=healthy)
    assert healthy.calls == 1
    assert [Path(p["image_path"]).name for p in preds] == ["img0.png", "img1.png", "img2.png"]
    assert json.loads((out / "summary.json").read_text())["resumed"] == 2

    # Everything done: nothing runs again; --overwrite redoes every image.
    again = FakePredictor()
    assert tool.main(_infer(tool, tmp_path), predictor=again)[0] == preds and again.calls == 0
    tool.main(_infer(tool, tmp_path, "--overwrite"), predictor=again)
    assert again.calls == 3


def test_pancap_infer_refuses_to_mix_settings(tmp_path):
    tool = _load_tool()
    _write_images(tmp_path / "images", 1)
    tool.main(_infer(tool, tmp_path, "--writer", "concat"), predictor=FakePredictor())
    predictor = FakePredictor()
    with pytest.raises(OutputPathError, match="writer: 'concat' then, 'template' now"):
        tool.main(_infer(tool, tmp_path, "--writer", "template"), predictor=predictor)
    assert predictor.calls == 0
    tool.main(_infer(tool, tmp_path, "--writer", "template", "--overwrite"), predictor=predictor)
    assert predictor.calls == 1


def test_pancap_infer_unreadable_images_are_dataset_errors(tmp_path):
    tool = _load_tool()
    _write_images(tmp_path / "images", 1)
    (tmp_path / "images" / "zz.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"summary.json: 1 of 2 image\(s\) failed .*zz.png"):
        tool.main(_infer(tool, tmp_path), predictor=FakePredictor())
    assert_no_partial_output(tmp_path / "out")


# --------------------------------------------------------------------------------------------
# eval_pancapscore
# --------------------------------------------------------------------------------------------
CAPTION = "A red circle [[0.1, 0.2, 0.3, 0.4]] is on the green grass [[0.0, 0.5, 1.0, 1.0]]."
OTHER = "A blue square [[0.5, 0.1, 0.7, 0.3]] is above the sand [[0.0, 0.6, 1.0, 1.0]]."


def _eval_tool():
    spec = importlib.util.spec_from_file_location("_eval_tool", TOOLS / "eval_pancapscore.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_pancapscore_continues_an_interrupted_run(tmp_path, capsys):
    tool = _eval_tool()
    gt = [{"image_path": f"sam/{k}.jpg", "gt_response": CAPTION} for k in "abc"]
    pred = [{"image_path": "sam/a.jpg", "model_response": CAPTION},
            {"image_path": "sam/b.jpg", "model_response": OTHER},
            {"image_path": "sam/c.jpg", "model_response": ""}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "pred.json").write_text(json.dumps(pred))

    def score(out, *flags):
        return tool.main(["--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "pred.json"),
                          "--output", str(out), "--no-embedder", *flags])

    whole = score(tmp_path / "whole.json")
    assert whole["resumed_images"] == 0 and whole["failed_images"] == []
    lines = (tmp_path / "whole.jsonl").read_text().splitlines()
    assert [json.loads(line)["image_path"] for line in lines] == [f"sam/{k}.jpg" for k in "abc"]

    # What a run killed after its first image leaves: its summary and one line (the summary
    # records no output path, so it is the same for another output name).
    os.makedirs(tmp_path / "cut")
    summary = json.loads((tmp_path / "whole.summary.json").read_text())
    (tmp_path / "cut" / "score.summary.json").write_text(
        json.dumps({"tool": summary["tool"], "status": "running", "settings": summary["settings"]})
    )
    (tmp_path / "cut" / "score.jsonl").write_text(lines[0] + "\n" + lines[1][:30])
    continued = score(tmp_path / "cut" / "score.json")
    assert continued["resumed_images"] == 1
    assert continued["per_image"] == whole["per_image"] and continued["mean"] == whole["mean"]
    assert (tmp_path / "cut" / "score.jsonl").read_text().splitlines() == lines

    # The output exists now: refused without --overwrite, replaced with it.
    with pytest.raises(OutputPathError, match="score.json: the output file exists"):
        score(tmp_path / "cut" / "score.json")
    assert score(tmp_path / "cut" / "score.json", "--overwrite")["resumed_images"] == 0
    assert "Overall" in capsys.readouterr().out
    assert_no_partial_output(tmp_path / "cut")


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
def test_demo_starts_over_by_default_and_continues_with_resume(setup):
    demo, config, images, out = setup

    def run(*flags):
        args = demo.get_parser().parse_args(
            ["--config-file", str(config), "--input", str(images), "--output", str(out), *flags]
        )
        return demo.main(args)

    first = run()
    assert len(_FakePanopticCaptioner.seen_inputs) == 2
    # Continued: both images are done, the model is not run, the same records come back.
    assert run("--resume") == first and len(_FakePanopticCaptioner.seen_inputs) == 2
    # A picture deleted since: that image alone is drawn again.
    (out / "b.png").unlink()
    assert run("--resume") == first and len(_FakePanopticCaptioner.seen_inputs) == 3
    assert (out / "b.png").is_file()
    with pytest.raises(OutputPathError, match=r"confidence: 0.5 then, 0.1 now.*without --resume"):
        run("--resume", "--confidence", "0.1")
    # Without --resume a run starts over.
    assert len(run("--confidence", "0.1")[0]["segments"]) == 3
    assert len(_FakePanopticCaptioner.seen_inputs) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["resumed"], summary["settings"]["confidence"]) == (
        "complete", 0, 0.1
    )
