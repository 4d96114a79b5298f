import json
import logging
import os

import pytest
import torch

from pix2cap.config import get_cfg
from pix2cap.engine import DefaultTrainer, hooks


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
    """Infinite loader cycling over fixed batches; a restart begins again at batch 0."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


class _Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return _CyclingLoader(_synthetic_batches())

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
