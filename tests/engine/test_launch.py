import multiprocessing
import os
import time

import pytest
import torch
import torch.distributed as dist

from pix2cap.config import get_cfg
from pix2cap.engine import DefaultTrainer, launch
from pix2cap.utils import comm


class _RankLoader:
    """Each rank sees different (fixed) images, so un-averaged gradients would differ."""

    def __init__(self, rank):
        generator = torch.Generator().manual_seed(100 + rank)
        image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8, generator=generator)
        sem_seg = (image[1].long() * 3 // 256).clamp(max=2)
        self.batch = [{"image": image, "sem_seg": sem_seg}]

    def __iter__(self):
        while True:
            yield self.batch


class _Trainer(DefaultTrainer):
    @classmethod
    def build_train_loader(cls, cfg):
        return _RankLoader(comm.get_rank())


def _train_worker(output_dir):
    """Runs in each spawned process: train 3 steps, then dump this rank's parameters."""
    assert dist.is_initialized() and dist.get_backend() == "gloo"
    cfg = get_cfg()
    cfg.MODEL.META_ARCHITECTURE = "PixelBaseline"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.MODEL.PIXEL_BASELINE.HIDDEN_DIM = 4
    cfg.MODEL.PIXEL_BASELINE.NUM_LAYERS = 2
    cfg.SOLVER.BASE_LR = 0.05
    cfg.SOLVER.MAX_ITER = 3
    cfg.SOLVER.WARMUP_ITERS = 0
    cfg.SOLVER.STEPS = ()
    cfg.OUTPUT_DIR = output_dir
    # A different seed per rank: DDP must broadcast rank 0's initial weights.
    torch.manual_seed(comm.get_rank())
    trainer = _Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    state = {k: v.detach().clone() for k, v in trainer.model.module.state_dict().items()}
    torch.save(
        {"state": state, "rank": comm.get_rank(), "local_rank": comm.get_local_rank(),
         "world_size": comm.get_world_size()},
        os.path.join(output_dir, f"rank{comm.get_rank()}.pt"),
    )


def _failing_worker(output_dir):
    if comm.get_rank() == 1:
        raise ValueError("rank 1 failed on purpose")
    # Rank 0 would run far longer than the test allows; the launcher must end it.
    time.sleep(600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo launch test")
def test_two_cpu_processes_train_with_averaged_gradients(tmp_path):
    launch(_train_worker, num_gpus_per_machine=2, dist_url="auto", args=(str(tmp_path),))
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert (rank0["rank"], rank0["local_rank"], rank0["world_size"]) == (0, 0, 2)
    assert (rank1["rank"], rank1["local_rank"], rank1["world_size"]) == (1, 1, 2)
    for name, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][name]), name
    # Training moved the weights away from rank 0's initialisation.
    torch.manual_seed(0)
    from pix2cap.modeling.meta_arch.pixel_baseline import PixelBaseline

    initial = PixelBaseline(
        num_classes=3, pixel_mean=[0.0] * 3, pixel_std=[1.0] * 3, hidden_dim=4, num_layers=2
    )
    assert not torch.equal(initial.predictor.weight, rank0["state"]["predictor.weight"])
    # Only rank 0 wrote the checkpoint and the metrics.
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(tmp_path / "model_final.pth", weights_only=True)
    assert torch.equal(final["model"]["predictor.weight"], rank0["state"]["predictor.weight"])
    assert (tmp_path / "metrics.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo launch test")
def test_a_failing_rank_stops_all_processes(tmp_path):
    start = time.monotonic()
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        launch(_failing_worker, num_gpus_per_machine=2, args=(str(tmp_path),))
    assert time.monotonic() - start < 120  # rank 0 was terminated, not waited for
    assert multiprocessing.active_children() == []


def _record_group(results):
    results.append((dist.is_initialized(), comm.get_world_size(), comm.get_rank(), os.getpid()))


def test_under_torchrun_the_group_comes_from_the_environment(monkeypatch):
    from pix2cap.engine.launch import _find_free_port

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_find_free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    results = []
    # num_gpus_per_machine is ignored: torchrun already started the processes.
    launch(_record_group, num_gpus_per_machine=4, args=(results,))
    assert results == [(True, 1, 0, os.getpid())]  # ran here, nothing spawned
    assert not dist.is_initialized()  # the group is torn down afterwards
