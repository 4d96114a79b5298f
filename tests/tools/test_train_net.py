"""tools/train_net.py end to end with the shapes Pix2Cap config on a tiny split: train,
resume, evaluate."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "shapes" / "pix2cap_effl0.yaml"


def _train_net(*opts, flags=(), env):
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(CONFIG)]
    result = subprocess.run(
        cmd + list(flags) + list(opts), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _eval_only(dataset, out, env, *opts):
    """--eval-only of the untrained shapes model on ``dataset`` at 64 px, into ``out``."""
    return _train_net(
        "DATASETS.TEST", f'("{dataset}",)', "INPUT.MIN_SIZE_TEST", "64",
        "DATALOADER.NUM_WORKERS", "0", "OUTPUT_DIR", str(out), *opts,
        flags=["--eval-only"], env=env,
    )


def test_train_resume_and_eval_only(tiny_shapes, tmp_path):
    out = tmp_path / "run"
    common = [
        "INPUT.IMAGE_SIZE", "64", "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "(100,)", "DATALOADER.NUM_WORKERS", "0", "LOG_PERIOD", "1",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "OUTPUT_DIR", str(out),
    ]
    log = _train_net(*common, "SOLVER.MAX_ITER", "4", env=tiny_shapes)
    assert "Starting training from iteration 0" in log
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert (out / "model_0000002.pth").exists() and (out / "config.yaml").exists()
    iterations = [json.loads(line)["iteration"] for line in (out / "metrics.json").open()]
    assert iterations[:4] == [0, 1, 2, 3]

    # Pretend the run was cut after the checkpoint of iteration 2: --resume goes on from 3.
    (out / "last_checkpoint").write_text("model_0000002.pth")
    log = _train_net(*common, "SOLVER.MAX_ITER", "6", flags=["--resume"], env=tiny_shapes)
    assert "Starting training from iteration 3" in log
    final = torch.load(out / "model_final.pth", weights_only=True)
    assert final["iteration"] == 5

    log = _train_net(
        *common, "MODEL.WEIGHTS", str(out / "model_final.pth"), "TEST.HTML_REPORT", "True",
        flags=["--eval-only"], env=tiny_shapes,
    )
    assert f"Loading from {out / 'model_final.pth'}" in log
    # Both evaluators of a "pix2cap" dataset ran on all of shapes_val and wrote their results.
    results = json.loads((out / "inference" / "shapes_val_results.json").read_text())
    assert {"PQ", "SQ", "RQ"} <= set(results["panoptic_seg"])
    assert {"mAP", "AP_det"} <= set(results["dense_caption"])
    # The shapes model writes grounded captions too, scored on the same pass.
    assert {"mIoU", "recall", "AP50", "CIDEr"} <= set(results["grounded_caption"])
    exported = json.loads(
        (out / "inference" / "shapes_val" / "panoptic_predictions.json").read_text()
    )
    assert len(exported["annotations"]) == 6

    # TEST.HTML_REPORT: a page per image, prediction beside ground truth, the results as tables.
    report = out / "inference" / "shapes_val" / "report"
    index = (report / "index.html").read_text()
    assert f"HTML report of 6 images: {report / 'index.html'}" in log
    assert len(re.findall(r'class="card" href="pages/\d+\.html"', index)) == 6
    assert f"<tr><th>PQ</th><td>{results['panoptic_seg']['PQ']:.4g}</td></tr>" in index
    entries = [json.loads(p.read_text()) for p in sorted((report / "pages").glob("*.entry.json"))]
    assert len(entries) == 6
    for entry in entries:
        assert set(entry["segments"]) == {"Prediction", "Ground truth"}
        assert 0.0 <= entry["scores"]["PQ"] <= 100.0
        assert entry["scores"]["true segments"] == entry["segments"]["Ground truth"] > 0
    # The prediction has the bridge's panoptic caption (TEST.PANCAP.WRITER, template: a box
    # per decoded segment, or the sentence for none), the ground truth the dataset's own,
    # their boxes cut out.
    page = (report / "pages" / f"{entries[0]['key']}.html").read_text()
    payload = json.loads(re.search(r'id="page-data">(.*?)</script>', page, re.DOTALL).group(1))
    prediction, truth = payload["views"]
    caption = "".join(p["text"] for p in prediction["panoptic"])
    if prediction["segments"]:
        assert any(p.get("literal") for p in prediction["panoptic"]), caption
    else:
        assert caption.startswith("The image shows no recognisable entities"), caption
    assert "".join(p["text"] for p in truth["panoptic"]).startswith("This image is")
    assert any(p.get("literal") for p in truth["panoptic"])


def test_eval_only_on_a_coconut_pancap_dataset(tiny_shapes, tmp_path):
    """A COCONut-PanCap-format split under the built-in coconut_pancap_val: --eval-only prints
    and writes PQ, caption metrics and grounding (an untrained head: the numbers are low, the
    protocol is what is checked)."""
    from tests.data.test_coco_panoptic import make_panoptic_fixture

    root = Path(tiny_shapes["PIX2CAP_DATASETS"])
    captions = {
        7: {"caption": "<300:A man> stands on <11:green grass> under <5:the sky>."},
        9: {"caption": "<2:A dog> lies on <4:the grass>."},
    }
    json_file, image_root, panoptic_root = make_panoptic_fixture(
        tmp_path / "fixture", extra_annotation_keys=captions
    )
    (root / "coco").mkdir()
    (root / "coconut" / "annotations").mkdir(parents=True)
    os.rename(image_root, root / "coco" / "val2017")
    os.rename(panoptic_root, root / "coconut" / "panoptic_val2017")
    os.rename(json_file, root / "coconut" / "annotations" / "coconut_pancap_val.json")
    out = tmp_path / "eval"
    log = _eval_only(
        "coconut_pancap_val", out, tiny_shapes,
        "INPUT.MAX_SIZE_TEST", "96", "MODEL.GROUNDED_HEAD.MAX_LENGTH", "32",
    )
    results = json.loads((out / "inference" / "coconut_pancap_val_results.json").read_text())
    assert {"PQ", "SQ", "RQ"} <= set(results["panoptic_seg"])
    grounded = results["grounded_caption"]
    assert {"mIoU", "recall", "AP50", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(grounded)
    assert grounded["num_images"] == 2 and grounded["gt_phrases"] == 5
    assert 0.0 <= grounded["mIoU"] <= 1.0 and 0.0 <= grounded["recall"] <= 1.0
    # Printed as tables, like the other tasks.
    assert "grounded_caption" in log and "mIoU" in log and "PQ" in log


def test_eval_only_without_java_still_writes_what_needs_no_java(tiny_shapes, tmp_path):
    """No `java` on PATH: METEOR and the PTB tokenizer are out, and only the metrics that need
    them are skipped, each with the reason; PQ, detection AP, caption truth and grounding are
    written."""
    empty = tmp_path / "bin"
    empty.mkdir()
    env = dict(tiny_shapes, PATH=str(empty))
    out = tmp_path / "eval"
    log = _eval_only(
        "shapes_val", out, env,
        "INPUT.MAX_SIZE_TEST", "64", "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0",
    )
    assert "without METEOR" in log
    results = json.loads((out / "inference" / "shapes_val_results.json").read_text())
    assert {"PQ", "SQ", "RQ"} <= set(results["panoptic_seg"])
    dense = results["dense_caption"]
    assert "AP_det" in dense and "caption_truth" in dense
    assert "mAP" not in dense and not any(k.startswith("AP@") for k in dense)
    assert "java" in dense["skipped"]["mAP"]
    # (The untrained model's segments match nothing: its caption metrics have no pairs.)
    assert {"METEOR", "CIDEr", "BLEU-4"} <= set(dense["skipped"])
    grounded = results["grounded_caption"]
    assert {"mIoU", "recall", "AP50"} <= set(grounded)
    for metric in ("METEOR", "CIDEr", "BLEU-4", "ROUGE-L"):
        assert "java" in grounded["skipped"][metric]


def _sapancap_split(env) -> None:
    """The shapes generator's SA-Pancap files of the tiny val split, where the built-in
    sapancap_val reads them."""
    import shutil

    root = Path(env["PIX2CAP_DATASETS"])
    shapes, sapancap = root / "shapes", root / "sapancap"
    shutil.copytree(shapes / "images" / "val", sapancap / "images" / "val")
    for kind in ("data_list", "gtcaption"):
        shutil.copy(shapes / "annotations" / f"sapancap_val_{kind}.json", sapancap)


def test_eval_only_on_an_sapancap_dataset(tiny_shapes, tmp_path):
    """An SA-Pancap-format split (the shapes generator's files) under the built-in
    sapancap_val: --eval-only writes the bridge's captions in the official prediction form and
    prints PancapScore's E / L / A / R / G / Overall with the setup that produced them."""
    _sapancap_split(tiny_shapes)
    out = tmp_path / "eval"
    log = _eval_only(
        "sapancap_val", out, tiny_shapes,
        "INPUT.MAX_SIZE_TEST", "64", "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0",
    )
    inference = out / "inference"
    results = json.loads((inference / "sapancap_val_results.json").read_text())
    score = results["pancapscore"]
    for key in ("E", "L", "A", "R", "G", "Overall"):
        assert key in score
    assert score["num_images"] == 6 and score["official"] is False
    assert score["protocol"] == "official" and set(score["official_code_crashes"]) == {
        "no_entities", "no_gt_entities", "no_pred_entities"
    }
    assert "structured" in score["judge"]
    predictions = json.loads((inference / "sapancap_val" / "pancap_predictions.json").read_text())
    assert len(predictions) == 6
    assert all(set(p) == {"image_path", "model_response"} for p in predictions)
    assert predictions[0]["image_path"].startswith("images/val/")
    assert "Overall" in log and "pancapscore" in log and "PancapScore (official protocol)" in log


def test_eval_only_html_report_of_a_captions_only_dataset(tiny_shapes, tmp_path):
    """TEST.HTML_REPORT on SA-Pancap (no masks in the ground truth): the prediction's segments
    and panoptic caption beside the true caption; no per-image PQ."""
    _sapancap_split(tiny_shapes)
    out = tmp_path / "eval"
    _eval_only(
        "sapancap_val", out, tiny_shapes, "INPUT.MAX_SIZE_TEST", "64",
        "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD", "0.0", "TEST.HTML_REPORT", "True",
        "TEST.HTML_REPORT_MAX_IMAGES", "2",
    )
    pages = out / "inference" / "sapancap_val" / "report" / "pages"
    entries = [json.loads(p.read_text()) for p in sorted(pages.glob("*.entry.json"))]
    assert len(entries) == 2  # TEST.HTML_REPORT_MAX_IMAGES
    for entry in entries:
        assert "PQ" not in entry["scores"] and "true segments" not in entry["scores"]
        page = (pages / f"{entry['key']}.html").read_text()
        payload = json.loads(re.search(r'id="page-data">(.*?)</script>', page, re.DOTALL).group(1))
        prediction, truth = payload["views"]
        assert prediction["name"] == "Prediction" and prediction["panoptic"]
        assert truth["name"] == "Ground truth" and truth["masks"] is None
        boxes = [p["xyxy"] for p in truth["panoptic"] if p.get("literal")]
        assert boxes and all(0.0 <= v <= 1.0 for box in boxes for v in box)
