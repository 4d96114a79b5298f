"""tools/train_net.py end to end with the shapes Pix2Cap config on a tiny split: train,
resume, evaluate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pix2cap.data.datasets.shapes import generate_shapes

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "shapes" / "pix2cap_effl0.yaml"


def _train_net(*opts, flags=(), env):
    cmd = [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", str(CONFIG)]
    result = subprocess.run(
        cmd + list(flags) + list(opts), env=env, cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.fixture
def tiny_shapes(datasets_root):
    # A complete split on disk is used as it is, so the built-in names load these tiny ones.
    for split in ("train", "val"):
        generate_shapes(str(datasets_root / "shapes"), split, num_images=6, image_size=64, seed=1)
    env = dict(os.environ, PIX2CAP_DATASETS=str(datasets_root), OMP_NUM_THREADS="1")
    return env


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
        *common, "MODEL.WEIGHTS", str(out / "model_final.pth"), flags=["--eval-only"],
        env=tiny_shapes,
    )
    assert f"Loading from {out / 'model_final.pth'}" in log
    # Both evaluators of a "pix2cap" dataset ran on all of shapes_val and wrote their results.
    results = json.loads((out / "inference" / "shapes_val_results.json").read_text())
    assert {"PQ", "SQ", "RQ"} <= set(results["panoptic_seg"])
    assert {"mAP", "AP_det"} <= set(results["dense_caption"])
    exported = json.loads(
        (out / "inference" / "shapes_val" / "panoptic_predictions.json").read_text()
    )
    assert len(exported["annotations"]) == 6
