"""Bad inputs through the real entry points, each as a user meets it: one subprocess per case.

Each case checks the exit status (1 for an error, 2 for a usage error), that stderr ends with
one line ``error: ...`` naming the file and the problem and holds no traceback, and that no
partial output is left (no temporary file, no half-written JSON). Failures found before the
model is built are cheap (a few seconds of imports); the dataset cases of ``train_net`` build
the model first, as the tool does.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from pix2cap.engine.defaults import setup_cfg
from tests.data.test_coco_panoptic import make_panoptic_fixture

from .conftest import (
    SHAPES_CONFIG,
    SHAPES_WEIGHTS,
    TOOLS,
    assert_error,
    assert_no_partial_output,
    assert_usage_error,
    run_tool,
    unwritable_folder,
    write_images,
    write_json,
)

# Evaluation on the CPU at 64 pixels, in this process (no loader workers).
EVAL_ONLY = [
    "--eval-only", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64",
]
GT_CAPTION = "A red circle [[0.1, 0.2, 0.3, 0.4]] is on the grass [[0.0, 0.5, 1.0, 1.0]]."


@dataclass
class Case:
    """One bad input: ``prepare(tmp_path, env)`` writes the files and returns the tool's
    arguments; the tool must fail with ``code`` and an error line containing ``fragments``
    (``{t}`` in a fragment stands for ``tmp_path``)."""

    tool: str
    prepare: Callable[[Path, dict], list]
    fragments: tuple[str, ...]
    code: int = 1
    check_output: tuple[str, ...] = ("out",)  # under tmp_path: no partial files may be left
    after: Optional[Callable[[Path], None]] = field(default=None)  # more checks of the files


CASES: dict[str, Case] = {}



def case(name: str, tool: str, *fragments: str, **kwargs):
    def register(prepare):
        CASES[name] = Case(tool, prepare, fragments, **kwargs)
        return prepare

    return register


def _yaml(t: Path, name: str, text: str) -> Path:
    path = t / name
    path.write_text(text, encoding="utf-8")
    return path


def _shapes_eval(t: Path, *opts) -> list:
    return ["--config-file", SHAPES_CONFIG, *EVAL_ONLY, "OUTPUT_DIR", t / "out", *opts]


def _small_pth(t: Path) -> Path:
    """A real (small) PyTorch checkpoint file."""
    path = t / "small.pth"
    torch.save({"model": {"w": torch.arange(4096, dtype=torch.float32)}}, path)
    return path


# --------------------------------------------------------------------------------------------
# train_net: config files and overrides
# --------------------------------------------------------------------------------------------
@case("train_net-missing-config", "train_net", "missing.yaml", "not found")
def _(t, env):
    return ["--config-file", t / "missing.yaml"]


@case("train_net-yaml-syntax-error", "train_net", "syntax.yaml", "YAML")
def _(t, env):
    return ["--config-file", _yaml(t, "syntax.yaml", "MODEL: [\n  DEVICE: cpu\n")]


@case("train_net-unknown-config-key", "train_net", "unknown.yaml", "MODEL.NOT_A_KEY")
def _(t, env):
    return ["--config-file", _yaml(t, "unknown.yaml", "MODEL:\n  NOT_A_KEY: 1\n")]


@case("train_net-wrong-type-in-yaml", "train_net", "type.yaml", "SOLVER.MAX_ITER")
def _(t, env):
    return ["--config-file", _yaml(t, "type.yaml", "SOLVER:\n  MAX_ITER: many\n")]


@case("train_net-unknown-override-key", "train_net", "SOLVER.NOT_A_KEY")
def _(t, env):
    return ["--config-file", SHAPES_CONFIG, "SOLVER.NOT_A_KEY", "3"]


@case("train_net-unknown-flag", "train_net", "--not-a-flag", code=2)
def _(t, env):
    return ["--config-file", SHAPES_CONFIG, "--not-a-flag"]


@case("train_net-output-dir-is-a-file", "train_net", "{t}/out", "is a file", check_output=())
def _(t, env):
    (t / "out").write_text("a file where OUTPUT_DIR should be")
    return _shapes_eval(t, "MODEL.WEIGHTS", SHAPES_WEIGHTS)


# --------------------------------------------------------------------------------------------
# train_net: weights files
# --------------------------------------------------------------------------------------------
@case("train_net-missing-weights", "train_net", "nowhere.pth", "not found")
def _(t, env):
    return _shapes_eval(t, "MODEL.WEIGHTS", t / "nowhere.pth")


def _bad_weights(file_name: str, content: Callable[[Path], bytes]):
    def prepare(t, env):
        (t / file_name).write_bytes(content(t))
        return _shapes_eval(t, "MODEL.WEIGHTS", t / file_name)

    return prepare


def _first_half(path: Path) -> bytes:
    data = path.read_bytes()
    return data[: len(data) // 2]


for _name, _file, _content, _problem in (
    ("random-bytes-weights", "random.pth", lambda t: os.urandom(4096), "corrupt"),
    ("truncated-weights", "truncated.pth", lambda t: _first_half(_small_pth(t)), "truncated"),
    ("empty-weights", "empty.pth", lambda t: b"", "empty"),
    ("random-bytes-safetensors", "random.safetensors", lambda t: os.urandom(4096),
     "safetensors"),
):
    case(f"train_net-{_name}", "train_net", _file, _problem)(
        _bad_weights(_file, _content)
    )


@case("train_net-https-weights-refused", "train_net", "https://example.invalid/model.pth", "URL")
def _(t, env):
    # An unresolvable host: were it fetched, the error would be a network one, not this.
    return _shapes_eval(t, "MODEL.WEIGHTS", "https://example.invalid/model.pth")


# --------------------------------------------------------------------------------------------
# train_net --eval-only: the dataset catalog on broken datasets
# --------------------------------------------------------------------------------------------
def _coco_val(env: dict, t: Path) -> Path:
    """A two-image ``coco_2017_val_panoptic`` under the case's ``$PIX2CAP_DATASETS``."""
    root = Path(env["PIX2CAP_DATASETS"]) / "coco"
    json_file, images, panoptic = make_panoptic_fixture(t / "fixture")
    (root / "annotations").mkdir(parents=True)
    shutil.move(images, root / "val2017")
    shutil.move(panoptic, root / "panoptic_val2017")
    shutil.move(json_file, root / "annotations" / "panoptic_val2017.json")
    return root


def _coco_eval(t: Path) -> list:
    return _shapes_eval(t, "DATASETS.TEST", '("coco_2017_val_panoptic",)')


def _traceback_in_log(t: Path) -> None:
    # The one line on the console; the whole traceback in OUTPUT_DIR/log.txt.
    log = (t / "out" / "log.txt").read_text()
    assert "Traceback (most recent call last)" in log and "panoptic_val2017.json" in log


@case("train_net-dataset-json-broken", "train_net", "panoptic_val2017.json", "JSON",
      after=_traceback_in_log)
def _(t, env):
    root = _coco_val(env, t)
    (root / "annotations" / "panoptic_val2017.json").write_text('{"images": [')
    return _coco_eval(t)


@case("train_net-dataset-image-missing", "train_net", "000000000007.jpg")
def _(t, env):
    root = _coco_val(env, t)
    (root / "val2017" / "000000000007.jpg").unlink()
    return _coco_eval(t)


@case("train_net-coco-panoptic-png-missing", "train_net", "000000000009.png")
def _(t, env):
    root = _coco_val(env, t)
    (root / "panoptic_val2017" / "000000000009.png").unlink()
    return _coco_eval(t)


@case("train_net-corrupt-image-in-loader-worker", "train_net", "000000000007.jpg")
def _(t, env):
    # Pixels are read by the mapper in a DataLoader worker: the worker's error comes back
    # wrapped with its traceback text, and must still end as one line.
    root = _coco_val(env, t)
    (root / "val2017" / "000000000007.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return _coco_eval(t) + ["DATALOADER.NUM_WORKERS", "1"]


@case("train_net-sapancap-data-list-not-a-list", "train_net", "sapancap_val_data_list.json", "list")
def _(t, env):
    root = Path(env["PIX2CAP_DATASETS"]) / "sapancap"
    write_json(root / "sapancap_val_data_list.json", {"sam/a.jpg": 1})
    write_json(root / "sapancap_val_gtcaption.json", [])
    return _shapes_eval(t, "DATASETS.TEST", '("sapancap_val",)')


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
def _demo(t: Path, *inputs, weights=SHAPES_WEIGHTS) -> list:
    return ["--config-file", SHAPES_CONFIG, "--input", *inputs, "--output", t / "out",
            "MODEL.WEIGHTS", weights]


@case("demo-missing-input-image", "demo", "nowhere.png", "no such file")
def _(t, env):
    return _demo(t, t / "nowhere.png")


def _summary_lists_broken(t: Path) -> None:
    summary = json.loads((t / "out" / "summary.json").read_text())
    assert summary["status"] == "incomplete" and summary["failed"] == 1
    assert summary["failures"][0]["image"].endswith("broken.png")
    assert not (t / "out" / "broken.png").exists()


@case("demo-corrupt-image", "demo", "broken.png", "1 of 1 image(s) failed",
      after=_summary_lists_broken)
def _(t, env):
    (t / "images").mkdir()
    (t / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return _demo(t, t / "images")


@case("demo-folder-without-images", "demo", "empty", "holds no")
def _(t, env):
    (t / "empty").mkdir()
    (t / "empty" / "notes.txt").write_text("no image here")
    return _demo(t, t / "empty")


@case("demo-output-is-a-file", "demo", "{t}/out", "is a file", check_output=())
def _(t, env):
    write_images(t / "images", 1)
    (t / "out").write_text("a file")
    return _demo(t, t / "images")


@case("demo-output-not-writable", "demo", "not writable", check_output=())
def _(t, env):
    write_images(t / "images", 1)
    return ["--config-file", SHAPES_CONFIG, "--input", t / "images", "--output",
            unwritable_folder(t)]


@case("demo-missing-weights", "demo", "nowhere.safetensors", "not found")
def _(t, env):
    write_images(t / "images", 1)
    return _demo(t, t / "images", weights=t / "nowhere.safetensors")


@case("demo-bad-confidence", "demo", "--confidence", code=2)
def _(t, env):
    return ["--confidence", "high"] + _demo(t, t / "images")


# --------------------------------------------------------------------------------------------
# pancap_infer
# --------------------------------------------------------------------------------------------
def _infer(t: Path, *source, writer=("--writer", "template")) -> list:
    return ["--config-file", SHAPES_CONFIG, *source, *writer, "--output", t / "out",
            "MODEL.WEIGHTS", SHAPES_WEIGHTS]


@case("pancap_infer-unknown-writer", "pancap_infer", "--writer", "gpt5", code=2)
def _(t, env):
    return _infer(t, "--input", t, writer=("--writer", "gpt5"))


@case("pancap_infer-lm-writer-without-lm-path", "pancap_infer", "--lm-path", code=2)
def _(t, env):
    return _infer(t, "--input", t, writer=("--writer", "small_lm"))


@case("pancap_infer-num-beams-zero", "pancap_infer", "--num-beams", code=2)
def _(t, env):
    return ["--num-beams", "0"] + _infer(t, "--input", t)


@case("pancap_infer-lm-path-missing", "pancap_infer", "no_lm")
def _(t, env):
    write_images(t / "images", 1)
    return _infer(t, "--input", t / "images",
                  writer=("--writer", "small_lm", "--lm-path", t / "no_lm"))


def _all_failed_summary(t: Path) -> None:
    out = t / "out"
    assert json.loads((out / "predictions.json").read_text()) == []
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["done"], summary["failed"]) == (1, 0, 1)
    assert (out / "predictions.jsonl").read_text() == ""


@case("pancap_infer-corrupt-image", "pancap_infer", "broken.jpg", "1 of 1 image(s) failed",
      after=_all_failed_summary)
def _(t, env):
    (t / "images").mkdir()
    (t / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
    return _infer(t, "--input", t / "images")


@case("pancap_infer-output-is-a-file", "pancap_infer", "{t}/out", "is a file", check_output=())
def _(t, env):
    write_images(t / "images", 1)
    (t / "out").write_text("a file")
    return _infer(t, "--input", t / "images")


@case("pancap_infer-output-not-writable", "pancap_infer", "not writable", check_output=())
def _(t, env):
    write_images(t / "images", 1)
    return ["--input", t / "images", "--output", unwritable_folder(t) / "pancap_out"]


@case("pancap_infer-unknown-dataset", "pancap_infer", "no_such_dataset")
def _(t, env):
    return _infer(t, "--dataset", "no_such_dataset")


@case("pancap_infer-sapancap-data-list-not-a-list", "pancap_infer",
      "sapancap_val_data_list.json", "list")
def _(t, env):
    root = Path(env["PIX2CAP_DATASETS"]) / "sapancap"
    write_json(root / "sapancap_val_data_list.json", "sam/a.jpg")
    return _infer(t, "--dataset", "sapancap_val")


@case("pancap_infer-sapancap-image-missing", "pancap_infer", "sa_1.jpg")
def _(t, env):
    root = Path(env["PIX2CAP_DATASETS"]) / "sapancap"
    write_json(root / "sapancap_val_data_list.json", ["sam/sa_000000/sa_1.jpg"])
    write_json(root / "sapancap_val_gtcaption.json",
               [{"image_path": "sam/sa_000000/sa_1.jpg", "gt_response": GT_CAPTION}])
    return _infer(t, "--dataset", "sapancap_val")


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_reliability_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _earlier_run(t: Path, writer: str) -> None:
    """What a run of ``_infer`` with ``--writer <writer>``, interrupted after one image,
    leaves: its summary (with the settings pancap_infer records) and one line."""
    write_images(t / "images", 2)
    tool = _load_tool("pancap_infer")
    args = tool.get_parser().parse_args(
        [str(a) for a in _infer(t, "--input", t / "images", writer=("--writer", writer))]
    )
    settings = tool.run_settings(args, setup_cfg(args))
    write_json(t / "out" / "summary.json",
               {"tool": "pancap_infer", "status": "running", "settings": settings})
    line = {"image_path": str(t / "images" / "img0.png"), "model_response": "A caption."}
    (t / "out" / "predictions.jsonl").write_text(json.dumps(line) + "\n")


@case("pancap_infer-rerun-with-other-settings", "pancap_infer", "predictions.jsonl",
      "other settings", "writer: 'concat' then, 'template' now", "--overwrite")
def _(t, env):
    _earlier_run(t, "concat")
    return _infer(t, "--input", t / "images")


@case("pancap_infer-jsonl-not-json", "pancap_infer", "predictions.jsonl",
      "line 1 is not valid JSON", check_output=())
def _(t, env):
    _earlier_run(t, "template")
    (t / "out" / "predictions.jsonl").write_text("not json\n")
    return _infer(t, "--input", t / "images")


# --------------------------------------------------------------------------------------------
# eval_pancapscore
# --------------------------------------------------------------------------------------------
def _gt(t: Path, entries=None) -> Path:
    return write_json(t / "gt.json", entries if entries is not None else
                      [{"image_path": "sam/a.jpg", "gt_response": GT_CAPTION},
                       {"image_path": "sam/b.jpg", "gt_response": GT_CAPTION}])


def _pred(t: Path, entries=None) -> Path:
    return write_json(t / "pred.json", entries if entries is not None else
                      [{"image_path": "sam/a.jpg", "model_response": GT_CAPTION}])


def _score(t: Path, gt: Path, pred: Path, output=None) -> list:
    output = output or t / "out" / "score.json"
    return ["--gt", gt, "--pred", pred, "--output", output, "--no-embedder"]


@case("eval_pancapscore-missing-gt", "eval_pancapscore", "nowhere.json", "cannot read")
def _(t, env):
    return _score(t, t / "nowhere.json", _pred(t))


@case("eval_pancapscore-gt-not-json", "eval_pancapscore", "gt.json", "not valid JSON")
def _(t, env):
    (t / "gt.json").write_text('[{"image_path": ')
    return _score(t, t / "gt.json", _pred(t))


@case("eval_pancapscore-pred-not-a-list", "eval_pancapscore", "pred.json", "must be a JSON list")
def _(t, env):
    return _score(t, _gt(t), _pred(t, {"sam/a.jpg": GT_CAPTION}))


@case("eval_pancapscore-entry-not-an-object", "eval_pancapscore", "pred.json",
      "entry [0] is not a JSON object")
def _(t, env):
    return _score(t, _gt(t), _pred(t, ["sam/a.jpg"]))


@case("eval_pancapscore-gt-missing-key", "eval_pancapscore", "gt.json", "no key 'gt_response'")
def _(t, env):
    return _score(t, _gt(t, [{"image_path": "sam/a.jpg", "caption": GT_CAPTION}]), _pred(t))


@case("eval_pancapscore-response-not-a-string", "eval_pancapscore", "pred.json",
      "'model_response' is not a string")
def _(t, env):
    return _score(t, _gt(t), _pred(t, [{"image_path": "sam/a.jpg", "model_response": 3}]))


@case("eval_pancapscore-duplicate-image-paths", "eval_pancapscore", "gt.json", "appears twice")
def _(t, env):
    entry = {"image_path": "sam/a.jpg", "gt_response": GT_CAPTION}
    return _score(t, _gt(t, [entry, dict(entry)]), _pred(t))


def _first_output_kept(t: Path) -> None:
    assert (t / "out" / "score.json").read_text() == '{"mean": "kept"}'
    assert not (t / "out" / "score.jsonl").exists()


@case("eval_pancapscore-output-exists", "eval_pancapscore", "score.json", "--overwrite",
      after=_first_output_kept)
def _(t, env):
    (t / "out").mkdir()
    (t / "out" / "score.json").write_text('{"mean": "kept"}')
    return _score(t, _gt(t), _pred(t))


@case("eval_pancapscore-output-is-a-folder", "eval_pancapscore", "score.json", "is a folder")
def _(t, env):
    (t / "out" / "score.json").mkdir(parents=True)
    return _score(t, _gt(t), _pred(t))


@case("eval_pancapscore-output-not-writable", "eval_pancapscore", "not writable", check_output=())
def _(t, env):
    return _score(t, _gt(t), _pred(t), output=unwritable_folder(t) / "score.json")


@case("eval_pancapscore-pancapchain-without-image-root", "eval_pancapscore", "--image-root",
      code=2)
def _(t, env):
    (t / "pancapchain").mkdir()
    return ["--pancapchain-dir", t / "pancapchain", "--gt", _gt(t),
            "--output", t / "out" / "s.json"]


@case("eval_pancapscore-pancapchain-file-not-json", "eval_pancapscore", "a.json")
def _(t, env):
    (t / "pancapchain").mkdir()
    (t / "pancapchain" / "a.json").write_text("{broken")
    return ["--pancapchain-dir", t / "pancapchain", "--image-root", t, "--gt", _gt(t),
            "--output", t / "out" / "s.json", "--no-embedder"]


@case("eval_pancapscore-hf-judge-without-model", "eval_pancapscore", "--judge-model", code=2)
def _(t, env):
    return _score(t, _gt(t), _pred(t)) + ["--judge", "hf_local"]


def _scored_the_others(t: Path) -> None:
    result = json.loads((t / "out" / "score.json").read_text())
    assert [f["image"] for f in result["failed_images"]] == ["sam/a.jpg"]
    assert [r["image_path"] for r in result["per_image"]] == ["sam/b.jpg"]
    assert result["mean"]["num_images"] == 1


@case("eval_pancapscore-one-image-fails-to-score", "eval_pancapscore", "score.json",
      "1 of 2 image(s) failed", "sam/a.jpg", after=_scored_the_others)
def _(t, env):
    # A structured entity with a three-number box: that image fails, the other is scored.
    bad = {"entities": [{"id": 1, "name": "circle", "box": [0.1, 0.2, 0.3]}]}
    pred = [{"image_path": "sam/a.jpg", "model_response": "", "structured": bad},
            {"image_path": "sam/b.jpg", "model_response": GT_CAPTION}]
    return _score(t, _gt(t), _pred(t, pred))


# --------------------------------------------------------------------------------------------
# the other tools
# --------------------------------------------------------------------------------------------
@case("export_model-random-bytes-checkpoint", "export_model", "random.pth", "corrupt")
def _(t, env):
    (t / "random.pth").write_bytes(os.urandom(2048))
    return [t / "random.pth", t / "out" / "model.safetensors"]


@case("export_model-output-not-safetensors", "export_model", "model.bin", ".safetensors")
def _(t, env):
    return [_small_pth(t), t / "out" / "model.bin"]


@case("visualize_data-unknown-dataset", "visualize_data", "no_such_dataset")
def _(t, env):
    return ["--dataset", "no_such_dataset", "--output", t / "out"]


@case("eval_grounded-missing-config", "eval_grounded", "missing.yaml", "not found")
def _(t, env):
    return ["--config-file", t / "missing.yaml", "--dataset", "shapes_val", "--output", t / "out"]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_in_one_line(name, tmp_path, env):
    c = CASES[name]
    args = c.prepare(tmp_path, env)
    result = run_tool(c.tool, *args, env=env)
    fragments = [f.replace("{t}", str(tmp_path)) for f in c.fragments]
    if c.code == 2:
        assert_usage_error(result, *fragments)
    else:
        assert_error(result, *fragments)
    assert_no_partial_output(*(tmp_path / p for p in c.check_output))
    if c.after is not None:
        c.after(tmp_path)


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
    tools = {c.tool for c in CASES.values()}
    assert {"train_net", "demo", "pancap_infer", "eval_pancapscore"} <= tools
