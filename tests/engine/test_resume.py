"""Resuming training: the trainer state, and a `tools/train_net.py` run killed with SIGKILL
and resumed with `--resume`, which must match a run never interrupted bit for bit."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pix2cap.config import get_cfg
from pix2cap.engine import DefaultTrainer, hooks

REPO = Path(__file__).resolve().parents[2]


def _synthetic_batches(num_batches=2, batch_size=2, size=16, num_classes=3):
    """A fixed list of mapper-style batches: uint8 images and sem_seg labels (255 = ignore)."""
    generator = torch.Generator().manual_seed(123)
    batches = []
    for _ in range(num_batches):
        batch = []
        for _ in range(batch_size):
            image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
            # Labels depend on the image so there is something to learn.
            sem_seg = (image[0].long() * num_classes // 256).clamp(max=num_classes - 1)
            sem_seg[:2] = 255
            batch.append({"image": image, "sem_seg": sem_seg, "height": size, "width": size})
        batches.append(batch)
    return batches


class _CyclingLoader:
    """Infinite loader cycling over fixed batches, from batch ``start`` on."""

    def __init__(self, batches, start=0):
        self.batches = batches
        self.start = start

    def __iter__(self):
        step = self.start
        while True:
            yield self.batches[step % len(self.batches)]
            step += 1


class _Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg, start_iter=0):
        # Three batches: a loader restarted at batch 0 would train iteration 4 on batch 0,
        # not on batch 1 as the uninterrupted run does.
        return _CyclingLoader(_synthetic_batches(num_batches=3), start=start_iter)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return [batch for batch in _synthetic_batches()]


def _cfg(output_dir, max_iter=8):
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "PixelBaseline"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.PIXEL_BASELINE.HIDDEN_DIM = 8
    cfg.MODEL.PIXEL_BASELINE.NUM_LAYERS = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.STEPS = (5,)
    cfg.SOLVER.WARMUP_ITERS = 3
    cfg.SOLVER.WARMUP_FACTOR = 0.1
    cfg.SOLVER.CHECKPOINT_PERIOD = 4
    cfg.SOLVER.AMP.ENABLED = True  # ignored on the CPU with a warning
    cfg.LOG_PERIOD = 2
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg


def _logged_rows(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.json").open()]


def _losses(row):
    return {k: v for k, v in row.items() if "loss" in k}


def _lr_recorder(lrs):
    return hooks.CallbackHook(
        before_step=lambda t: lrs.__setitem__(t.iter, t.optimizer.param_groups[0]["lr"])
    )


def _run(cfg, resume=False, extra_hooks=()):
    torch.manual_seed(0)
    trainer = _Trainer(cfg)
    trainer.register_hooks(extra_hooks)
    trainer.resume_or_load(resume=resume)
    start_iter = trainer.start_iter
    trainer.train()
    return trainer, start_iter


class _Interrupt(Exception):
    pass


def test_resume_continues_where_the_interrupted_run_stopped(tmp_path):
    reference_lrs = {}
    reference, _ = _run(_cfg(tmp_path / "full"), extra_hooks=[_lr_recorder(reference_lrs)])
    written = set(os.listdir(tmp_path / "full"))
    checkpoints = {"last_checkpoint", "model_0000003.pth", "model_0000007.pth", "model_final.pth"}
    assert checkpoints | {"metrics.json"} <= written
    assert any(name.startswith("events.out.tfevents") for name in written)
    assert not any(name.endswith(".tmp") for name in written)
    logged = (tmp_path / "full" / "metrics.json").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in logged] == [1, 3, 5, 7]

    def stop_after_iteration_5(trainer):
        if trainer.iter == 5:
            raise _Interrupt()

    with pytest.raises(_Interrupt):
        interrupt = hooks.CallbackHook(after_step=stop_after_iteration_5)
        _run(_cfg(tmp_path / "cut"), extra_hooks=[interrupt])
    assert (tmp_path / "cut" / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (tmp_path / "cut" / "model_final.pth").exists()

    resumed_lrs = {}
    torch.manual_seed(999)  # a different initialisation must be overwritten by the checkpoint
    resumed, start_iter = _run(
        _cfg(tmp_path / "cut"), resume=True, extra_hooks=[_lr_recorder(resumed_lrs)]
    )
    assert start_iter == 4
    assert sorted(resumed_lrs) == [4, 5, 6, 7]
    assert resumed_lrs == {i: reference_lrs[i] for i in range(4, 8)}
    assert resumed_lrs[4] == pytest.approx(0.01) and resumed_lrs[5] == pytest.approx(0.001)
    for name, value in reference.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
    final = torch.load(tmp_path / "cut" / "model_final.pth", weights_only=True)
    assert final["iteration"] == 7 and final["trainer"]["iteration"] == 7
    # SEED is -1: the seed drawn by the interrupted run is saved and the resumed run takes it.
    first = torch.load(tmp_path / "cut" / "model_0000003.pth", weights_only=True)
    assert resumed.cfg.SEED == first["trainer"]["seed"] == final["trainer"]["seed"] >= 0
    # The row of iteration 5 the interrupted run logged is replaced, not repeated, and the
    # smoothed losses (medians over the restored history) are the uninterrupted run's.
    rows, reference_rows = _logged_rows(tmp_path / "cut"), _logged_rows(tmp_path / "full")
    assert [row["iteration"] for row in rows] == [1, 3, 5, 7]
    assert [_losses(row) for row in rows] == [_losses(row) for row in reference_rows]
    assert len({row["total_loss"] for row in rows}) > 1


def test_a_loader_without_start_iter_is_resumed_from_its_start_with_a_warning(tmp_path, caplog):
    class LegacyTrainer(_Trainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return _CyclingLoader(_synthetic_batches(num_batches=3))

    cfg = _cfg(tmp_path, max_iter=4)
    LegacyTrainer(cfg).train()
    trainer = LegacyTrainer(_cfg(tmp_path, max_iter=6))
    with caplog.at_level(logging.WARNING):
        trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4
    assert any("takes no start_iter" in r.getMessage() for r in caplog.records)
    assert next(iter(trainer.data_loader)) is trainer.data_loader.batches[0]


def test_without_resume_only_model_weights_are_loaded(tmp_path, caplog):
    first, _ = _run(_cfg(tmp_path / "a", max_iter=4))
    cfg = _cfg(tmp_path / "b", max_iter=4)
    cfg.MODEL.WEIGHTS = str(tmp_path / "a" / "model_final.pth")
    torch.manual_seed(5)
    trainer = _Trainer(cfg)
    trainer.resume_or_load(resume=False)
    assert trainer.start_iter == 0
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[name])
    # The optimizer starts fresh: no moments were loaded.
    assert trainer.optimizer.state_dict()["state"] == {}

    cfg.DATASETS.TEST = ("synthetic_without_evaluator",)
    with caplog.at_level(logging.INFO):
        results = _Trainer.test(cfg, trainer.model)
    assert results == {}
    assert any("has no evaluator" in r.getMessage() for r in caplog.records)


# Runs tools/train_net.py and SIGKILLs itself halfway through writing the checkpoint of
# iteration $KILL_AT: a real kill at the worst moment, leaving a half-written temporary file.
_KILLING_DRIVER = """
import os, runpy, signal, sys
import torch

kill_at = int(os.environ["KILL_AT"])
save = torch.save

def save_or_die(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("iteration") == kill_at:
        f.write(b"PK half a checkpoint")
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return save(obj, f, *args, **kwargs)

torch.save = save_or_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _train_net(output_dir, env, *, workers, flags=(), driver=None):
    """tools/train_net.py on the tiny shapes split for 8 iterations (checkpoints after 2, 5
    and 7), with the shapes model's dropout, point sampling and LSJ augmentations."""
    opts = [
        "INPUT.IMAGE_SIZE", "64", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "8",
        "SOLVER.CHECKPOINT_PERIOD", "3", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(100,)",
        "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256", "DATASETS.TEST", "()", "LOG_PERIOD", "1",
        "DATALOADER.NUM_WORKERS", str(workers), "OUTPUT_DIR", str(output_dir),
    ]
    script = [str(REPO / "tools" / "train_net.py"), *flags]
    script += ["--config-file", str(REPO / "configs" / "shapes" / "pix2cap_effl0.yaml")]
    command = [sys.executable] + ([str(driver)] if driver else []) + script + opts
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def test_train_net_killed_mid_checkpoint_resumes_exactly(tiny_shapes, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = _train_net(full, tiny_shapes, workers=0)
    assert done.returncode == 0, done.stderr[-3000:]

    driver = tmp_path / "kill_during_save.py"
    driver.write_text(_KILLING_DRIVER)
    killed = _train_net(cut, dict(tiny_shapes, KILL_AT="5"), workers=2, driver=driver)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (cut / "last_checkpoint").read_text() == "model_0000002.pth"
    stale = [name for name in os.listdir(cut) if name.endswith(".tmp")]
    assert len(stale) == 1 and stale[0].startswith(".model_0000005.pth.")
    assert [row["iteration"] for row in _logged_rows(cut)] == [0, 1, 2, 3, 4, 5]

    # Another number of loader workers: batches and augmentations must not depend on it.
    resumed = _train_net(cut, tiny_shapes, workers=1, flags=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert "Starting training from iteration 3" in log
    assert f"Removed {cut / stale[0]}" in log
    assert not [name for name in os.listdir(cut) if name.endswith(".tmp")]

    rows, reference_rows = _logged_rows(cut), _logged_rows(full)
    assert [row["iteration"] for row in rows] == list(range(8))
    assert [_losses(row) for row in rows] == [_losses(row) for row in reference_rows]
    assert len({row["total_loss"] for row in rows}) == 8  # the losses do move
    weights = torch.load(cut / "model_final.pth", weights_only=True)["model"]
    reference = torch.load(full / "model_final.pth", weights_only=True)["model"]
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(weights[name], value), name
