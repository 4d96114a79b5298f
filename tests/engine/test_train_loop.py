import itertools
import logging

import pytest
import torch
from torch import nn

from pix2cap.config import get_cfg
from pix2cap.engine import AMPTrainer, HookBase, SimpleTrainer, hooks
from pix2cap.evaluation import DatasetEvaluator, inference_on_dataset
from pix2cap.utils.events import get_event_storage


class _Regression(nn.Module):
    """Fits y = 3x - 1; returns a loss dict like a pix2cap model in training mode."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        y = torch.stack([d["y"] for d in batch])
        return {"loss_mse": ((self.linear(x) - y) ** 2).mean()}


def _batches(seed=0, size=8):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(size, 1, generator=generator)
    batch = [{"x": xi, "y": 3 * xi - 1} for xi in x]
    return itertools.repeat(batch)


def _trainer(model=None, **kwargs):
    torch.manual_seed(0)
    model = model or _Regression()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    return SimpleTrainer(model, _batches(), optimizer, **kwargs)


def test_hooks_run_in_order_around_every_step():
    calls = []

    class Recorder(HookBase):
        def __init__(self, tag):
            self.tag = tag

        def before_train(self):
            calls.append((self.tag, "before_train", self.trainer.iter))

        def before_step(self):
            calls.append((self.tag, "before_step", self.trainer.iter))

        def after_backward(self):
            grad = self.trainer.model.linear.weight.grad
            calls.append((self.tag, "after_backward", grad is not None))

        def after_step(self):
            calls.append((self.tag, "after_step", self.trainer.iter))

        def after_train(self):
            calls.append((self.tag, "after_train", self.trainer.iter))

    trainer = _trainer()
    trainer.register_hooks([Recorder("a"), None, Recorder("b")])
    trainer.train(3, 5)
    step = lambda i: [  # noqa: E731
        ("a", "before_step", i),
        ("b", "before_step", i),
        ("a", "after_backward", True),
        ("b", "after_backward", True),
        ("a", "after_step", i),
        ("b", "after_step", i),
    ]
    assert calls == [
        ("a", "before_train", 3),
        ("b", "before_train", 3),
        *step(3),
        *step(4),
        ("a", "after_train", 5),
        ("b", "after_train", 5),
    ]


def test_loss_decreases_and_metrics_are_recorded():
    trainer = _trainer()
    losses = []
    record = hooks.CallbackHook(
        after_step=lambda t: losses.append(t.storage.history("total_loss").latest())
    )
    trainer.register_hooks([record])
    trainer.train(0, 40)
    assert losses[-1] < 0.01 * losses[0]
    assert trainer.storage.history("loss_mse").latest() == losses[-1]
    assert "data_time" in trainer.storage.histories()
    weight, bias = trainer.model.linear.weight.item(), trainer.model.linear.bias.item()
    assert weight == pytest.approx(3.0, abs=0.3) and bias == pytest.approx(-1.0, abs=0.2)


def test_non_finite_loss_names_the_iteration_and_losses():
    class Exploding(_Regression):
        def forward(self, batch):
            loss = super().forward(batch)["loss_mse"]
            storage = get_event_storage()
            bad = loss * float("inf") if storage.iter == 2 else loss
            return {"loss_mse": loss, "loss_bad": bad}

    trainer = _trainer(Exploding())
    after_train = []
    trainer.register_hooks([hooks.CallbackHook(after_train=lambda t: after_train.append(t.iter))])
    with pytest.raises(FloatingPointError, match=r"iteration=2.*loss_bad=inf"):
        trainer.train(0, 5)
    assert after_train == [2]  # after_train still ran, at the failing iteration


def test_grad_clipper_is_applied_before_the_step():
    seen_norms = []

    def clipper(params):
        params = list(params)
        torch.nn.utils.clip_grad_norm_(params, 1e-3)
        seen_norms.append(torch.cat([p.grad.flatten() for p in params]).norm().item())

    trainer = _trainer(grad_clipper=clipper)
    before = trainer.model.linear.weight.item()
    trainer.train(0, 1)
    assert seen_norms == [pytest.approx(1e-3, rel=1e-3)]
    # SGD lr 0.5 with a clipped gradient moves the weight by at most 0.5 * 1e-3.
    assert abs(trainer.model.linear.weight.item() - before) <= 0.5e-3 + 1e-7


def test_trainer_state_dict_is_plain_data():
    trainer = _trainer()
    scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=1)
    trainer.register_hooks([hooks.LRScheduler(scheduler=scheduler)])
    trainer.train(0, 2)
    state = trainer.state_dict()
    assert state["iteration"] == 2
    assert set(state) == {"iteration", "hooks", "optimizer", "storage"}
    assert state["hooks"]["LRScheduler"]["last_epoch"] == 2
    # The recent metric history, for a resumed run's smoothed metrics.
    assert state["storage"]["lr"] == {
        "values": [0.5, 0.05], "iterations": [0, 1], "smoothing_hint": False
    }
    assert trainer.storage.history("lr").values() == [(0.5, 0), (0.05, 1)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_amp_trainer_refuses_a_cpu_model():
    model = _Regression()
    with pytest.raises(RuntimeError, match="AMPTrainer needs a model on CUDA"):
        AMPTrainer(model, _batches(), torch.optim.SGD(model.parameters(), lr=0.1))


def test_eval_hook_runs_periodically_and_at_the_end():
    calls = []

    def evaluate():
        calls.append(trainer.iter)
        return {"task": {"metric": float(len(calls))}}

    trainer = _trainer()
    trainer.register_hooks([hooks.EvalHook(2, evaluate)])
    trainer.train(0, 5)
    assert calls == [1, 3, 5]  # after iterations 1 and 3, and at the end
    assert trainer.storage.history("task/metric").values()[-1][0] == 3.0


class _CountingEvaluator(DatasetEvaluator):
    def reset(self):
        self.count = 0

    def process(self, inputs, outputs):
        assert len(inputs) == len(outputs)
        self.count += len(outputs)

    def evaluate(self):
        return {"count": {"images": self.count}}


def test_inference_on_dataset_uses_eval_mode_without_grad_and_restores(caplog):
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(1, 1)
            self.seen = []

        def forward(self, batch):
            self.seen.append((self.training, torch.is_grad_enabled()))
            return [{"y": self.linear(d["x"])} for d in batch]

    model = Probe().train()
    loader = [[{"x": torch.ones(1)}] * 2 for _ in range(7)]
    with caplog.at_level(logging.INFO):
        results = inference_on_dataset(model, loader, _CountingEvaluator(), warmup_iters=2)
    assert results == {"count": {"images": 14}}
    assert set(model.seen) == {(False, False)} and model.training
    assert any("s / image" in r.getMessage() for r in caplog.records)
    assert inference_on_dataset(model, loader, None) == {}


def test_build_evaluator_looks_up_the_dataset_evaluator_type(tmp_path):
    from pix2cap.data.catalog import MetadataCatalog
    from pix2cap.evaluation import EVALUATOR_REGISTRY, build_evaluator

    class _Recording(DatasetEvaluator):
        def __init__(self, dataset_name, output_dir):
            self.dataset_name, self.output_dir = dataset_name, output_dir

    EVALUATOR_REGISTRY._do_register("_engine_test_type", _Recording)
    try:
        MetadataCatalog.get("_engine_test_ds").set(evaluator_type="_engine_test_type")
        MetadataCatalog.get("_engine_test_unknown").set(evaluator_type="_not_registered")
        evaluator = build_evaluator(get_cfg(), "_engine_test_ds", str(tmp_path))
        assert isinstance(evaluator, _Recording)
        assert (evaluator.dataset_name, evaluator.output_dir) == ("_engine_test_ds", str(tmp_path))
        assert build_evaluator(get_cfg(), "_engine_test_unknown", str(tmp_path)) is None
        assert build_evaluator(get_cfg(), "_engine_test_no_type", str(tmp_path)) is None
    finally:
        EVALUATOR_REGISTRY._obj_map.pop("_engine_test_type")
        for name in ("_engine_test_ds", "_engine_test_unknown", "_engine_test_no_type"):
            MetadataCatalog.pop(name, None)
