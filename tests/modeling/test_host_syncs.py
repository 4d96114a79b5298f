"""A training step waits for the device only where it must: host synchronisations of one step.

A training step on an accelerator should queue work and move on; every time the host needs a
value computed on the device (``.item()``, ``.tolist()``, ``bool(tensor)``, an output whose
shape depends on device values such as boolean-mask indexing or ``nonzero``) or copies host
data to the device with a blocking copy, it waits until the device has finished everything
queued before. These tests run one real training step (``SimpleTrainer.run_step``: forward,
losses, backward, gradient clipping, optimizer step) of a small Pix2Cap built from the shapes
config (scene memory, grounded caption head with copied captions) on the CPU and count those
waits in two ways:

* ``SyncTracker``, a ``TorchFunctionMode`` that simulates an accelerator: the model's
  parameters and buffers, everything computed from them and everything moved to their
  ``.device`` are "device" tensors (their ``.device`` reads ``cpu:0``), the loader's data is
  host data. It counts device values read on the host (``d2h``), device-dependent output
  shapes (``shape``), blocking host-to-device copies (``h2d``: a stream synchronisation on
  CUDA), and ops mixing device and host tensors (``mixed``: an error on a real device);
* the profiler's ``aten::_local_scalar_dense`` (every scalar read) and ``aten::nonzero``
  events outside the optimizer (whose step counters are host tensors on any device).

What remains in one step, whatever the batch size and the number of queries:

* one cost-matrix copy per ``HungarianMatcher`` call, for ``linear_sum_assignment`` on the
  host: one per decoder prediction (``DEC_LAYERS``; the grounded head shares the criterion's
  matching of the final prediction);
* the deformable pixel decoder builds its level sizes with ``torch.tensor(..., device=)`` (a
  blocking copy) once per encoder layer (``pixel_decoder/msdeformattn.py``).

The losses themselves are read once per ``LOG_PERIOD`` (``SimpleTrainer.metrics_period``):
one copy for all the iterations since the last read.

A step that read every value when it was computed (batch 1 / batch 3, 4 queries) had 88 / 181
by this count: 35 / 66 device reads (15 of them the losses, read every step), 11 / 31
device-dependent shapes and 42 / 84 blocking copies; the profiler saw 32 / 50 scalar reads and
25 / 65 ``nonzero``. This one has 4 (3 matcher copies, 1 copy in the pixel decoder) and no
scalar read.
"""

import collections
import itertools
import os
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile
from torch.utils.weak import WeakIdKeyDictionary

from pix2cap.config import get_cfg
from pix2cap.engine import SimpleTrainer, hooks
from pix2cap.modeling import build_model
from pix2cap.solver import build_gradient_clipper, build_optimizer
from pix2cap.utils.events import EventStorage
from tests.modeling.test_grounded_head import grounded_input

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES_CONFIG = os.path.join(REPO, "configs", "shapes", "pix2cap_effl0.yaml")

DEC_LAYERS = 3  # three decoder predictions: the final one and two auxiliary ones
NUM_LOSS_LAYERS = 2
ENC_LAYERS = 1
# One matcher copy per prediction (the grounded head shares the final one's); the pixel
# decoder's level sizes per encoder layer.
EXPECTED = DEC_LAYERS + ENC_LAYERS
MAX_SYNCS_PER_STEP = EXPECTED


# ---------------------------------------------------------------------------------------------
# An accelerator simulated on the CPU
# ---------------------------------------------------------------------------------------------
DEV = torch.device("cpu", 0)  # what a device tensor's .device reads inside the tracker
_D2H = {"item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__"}
_SHAPE = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select"}
_NOT_MIXED = {"__get__", "__set__", "to", "copy_", "__getitem__", "__setitem__", "tensor",
              "as_tensor", "detach", "numpy", "__repr__", "__format__"}
# Library code that keeps every tensor on its own device (its device objects are real ones,
# which this CPU run cannot tell apart from the simulated device).
_TRUSTED = (os.path.join("torch", "optim", ""), os.path.join("torch", "nn", "utils", "clip_grad"))


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _is_dev(device) -> bool:
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device == DEV


class SyncTracker(TorchFunctionMode):
    """Counts, by kind and call site, what would make the host wait for an accelerator (see
    the module docstring); ``seeds`` are the device tensors to start from."""

    def __init__(self, seeds=()):
        super().__init__()
        self.dev = WeakIdKeyDictionary()
        for t in seeds:
            self.dev[t] = True
        self.events = collections.Counter()

    def is_dev(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self.dev.get(t, False)

    def counts(self) -> dict:
        out = collections.Counter()
        for (kind, _, _), n in self.events.items():
            out[kind] += n
        return dict(out)

    def total(self) -> int:
        return sum(self.events.values())

    def files(self, kind=None) -> set:
        return {site.split(":")[0] for (k, _, site) in self.events if kind in (None, k)}

    def report(self) -> str:
        rows = sorted(self.events.items(), key=lambda kv: kv[0][2])
        return "\n".join(f"{n:4d} {kind:5s} {what:34s} {site}" for (kind, what, site), n in rows)

    def _hit(self, kind: str, what: str) -> None:
        stack = traceback.extract_stack()[:-2]
        if any(lib in f.filename for f in stack for lib in _TRUSTED):
            return
        ours = [f for f in stack if os.sep + "pix2cap" + os.sep in f.filename]
        site = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else "?"
        self.events[(kind, what, site)] += 1

    def _index(self, index, value, setting: bool) -> None:
        for item in index if isinstance(index, tuple) else (index,):
            if isinstance(item, torch.Tensor):
                if item.dtype == torch.bool and item.dim() > 0:
                    # x[mask] = scalar is a masked fill; anything else needs nonzero(mask).
                    scalar = not isinstance(value, torch.Tensor) or value.dim() == 0
                    if not (setting and scalar):
                        self._hit("shape", "boolean-mask index")
                elif item.dim() > 0 and not self.is_dev(item):
                    self._hit("h2d", "host index tensor")
            elif isinstance(item, list) and item:
                self._hit("h2d", "list index")

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = getattr(func, "__self__", None)
        if name == "__get__" and getattr(owner, "__name__", None) == "device":
            real = func(*args, **kwargs)
            return DEV if self.is_dev(args[0]) else real
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        any_dev = any(self.is_dev(t) for t in ins)
        out_dev = any_dev
        if name in _D2H:
            if any_dev:
                self._hit("d2h", name)
            out_dev = False
        elif name == "to":
            target, non_blocking = kwargs.get("device"), kwargs.get("non_blocking")
            seen_bool = False
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    target = a
                elif isinstance(a, torch.Tensor):
                    target = DEV if self.is_dev(a) else torch.device("cpu")
                elif isinstance(a, bool) and not seen_bool:
                    non_blocking, seen_bool = a, True
            if target is not None:
                out_dev = _is_dev(target)
                if self.is_dev(args[0]) and not out_dev:
                    self._hit("d2h", "to(host)")
                elif out_dev and not self.is_dev(args[0]) and not non_blocking:
                    self._hit("h2d", "blocking to(device)")
        elif name in ("tensor", "as_tensor"):
            data = args[0] if args else kwargs.get("data")
            if any_dev and not isinstance(data, torch.Tensor):
                self._hit("d2h", f"torch.{name}(device values)")
                out_dev = False
            if _is_dev(kwargs.get("device")) and not self.is_dev(data):
                self._hit("h2d", f"torch.{name}(host data, device=)")
        elif name == "copy_":
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            if self.is_dev(args[0]) and not self.is_dev(args[1]) and not non_blocking:
                self._hit("h2d", "blocking copy_")
            elif not self.is_dev(args[0]) and self.is_dev(args[1]):
                self._hit("d2h", "copy_ to host")
            out_dev = self.is_dev(args[0])
        elif name in ("__getitem__", "__setitem__"):
            value = args[2] if len(args) > 2 else None
            if self.is_dev(args[0]):
                self._index(args[1], value, setting=name == "__setitem__")
                if isinstance(value, torch.Tensor) and value.dim() > 0 and not self.is_dev(value):
                    self._hit("h2d", "host value set into device tensor")
            elif name == "__setitem__" and self.is_dev(value):
                self._hit("d2h", "device value set into host tensor")
            out_dev = self.is_dev(args[0])
        elif name in _SHAPE or (name == "where" and len(args) + len(kwargs) == 1):
            if any_dev:
                self._hit("shape", name)
        elif name == "repeat_interleave" and "output_size" not in kwargs and any_dev:
            if len(args) > 1 and isinstance(args[1], torch.Tensor):
                self._hit("shape", name)
        elif name not in _NOT_MIXED and any_dev:
            if any(not self.is_dev(t) and t.dim() > 0 for t in ins):
                self._hit("mixed", name)
        if _is_dev(kwargs.get("device")):
            out_dev = True
        out = func(*args, **kwargs)
        if out_dev:
            for t in _tensors(out):
                self.dev[t] = True
            if args and ((name.endswith("_") and name != "copy_") or name == "__setitem__"):
                for t in _tensors(args[0]):  # in place (a tensor, or a list for _foreach_)
                    self.dev[t] = True
        return out


def test_tracker_sees_what_would_wait():
    weight = torch.randn(4)
    tracker = SyncTracker([weight])
    with tracker:
        x = weight * 2  # device
        assert x.device == DEV and torch.ones(1).device != DEV
        float(x.sum())  # d2h
        x[x > 0]  # shape
        x[torch.tensor([0, 1])]  # h2d (host index)
        x[torch.tensor([0, 1]).to(x.device, non_blocking=True)]  # fine
        torch.ones(3).to(x.device)  # h2d
        x + torch.ones(4)  # mixed
        torch.arange(3, device=x.device).tolist()  # d2h
        host = torch.ones(3)
        host.sum().item()  # host only: fine
    assert tracker.counts() == {"d2h": 2, "shape": 1, "h2d": 2, "mixed": 1}, tracker.report()


# ---------------------------------------------------------------------------------------------
# One training step of a small shapes model
# ---------------------------------------------------------------------------------------------
def small_shapes_cfg(num_queries: int):
    cfg = get_cfg()
    cfg.merge_from_file(SHAPES_CONFIG)
    cfg.merge_from_list(
        [
            "MODEL.BACKBONE.WEIGHTS", "",
            "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32,
            "MODEL.SEM_SEG_HEAD.MASK_DIM", 32,
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS", ENC_LAYERS,
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_DIM_FEEDFORWARD", 64,
            "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_N_POINTS", 2,
            "MODEL.MASK_FORMER.HIDDEN_DIM", 32,
            "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", num_queries,
            "MODEL.MASK_FORMER.DIM_FEEDFORWARD", 64,
            "MODEL.MASK_FORMER.DEC_LAYERS", DEC_LAYERS,
            "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", 64,
            "MODEL.CAPTION_HEAD.HIDDEN_SIZE", 32,
            "MODEL.CAPTION_HEAD.NUM_LAYERS", 1,
            "MODEL.CAPTION_HEAD.INTERMEDIATE_SIZE", 64,
            "MODEL.CAPTION_HEAD.NUM_LOSS_LAYERS", NUM_LOSS_LAYERS,
            "MODEL.GROUNDED_HEAD.HIDDEN_SIZE", 32,
            "MODEL.GROUNDED_HEAD.NUM_LAYERS", 1,
            "MODEL.GROUNDED_HEAD.INTERMEDIATE_SIZE", 64,
            "MODEL.GROUNDED_HEAD.MAX_LENGTH", 64,
            "LOG_PERIOD", 20,
        ]
    )
    return cfg


def batch_of(size: int) -> list[dict]:
    """Images of three segments each (things and stuff, captions, a grounded caption); the
    second has a crowd segment, the third no grounded caption."""
    batch = [grounded_input(seed=i) for i in range(size)]
    if size > 1:
        batch[1]["instances"].gt_iscrowd = torch.tensor([False, True, False])
    if size > 2:
        batch[2]["grounded_caption"] = None
    return batch


def _device_tensors(model, optimizer) -> list[torch.Tensor]:
    seeds = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        seeds += [v for k, v in state.items() if isinstance(v, torch.Tensor) and k != "step"]
    return seeds


def _profiled_syncs(prof) -> collections.Counter:
    """Scalar reads and nonzero calls outside ``Optimizer.step``."""
    counts = collections.Counter()
    for event in prof.events():
        if event.name in ("aten::_local_scalar_dense", "aten::nonzero"):
            parent = event.cpu_parent
            while parent is not None and not parent.name.startswith("Optimizer."):
                parent = parent.cpu_parent
            if parent is None:
                counts[event.name] += 1
    return counts


def measure_step(batch_size: int, num_queries: int):
    """(tracker, profiler counts) of the second training step (the first creates the
    optimizer state) of a fresh small shapes model."""
    torch.manual_seed(0)
    cfg = small_shapes_cfg(num_queries)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(
        model,
        itertools.repeat(batch_of(batch_size)),
        optimizer,
        build_gradient_clipper(cfg),
        metrics_period=cfg.LOG_PERIOD,
    )
    with EventStorage(0) as trainer.storage:
        trainer.iter = trainer.storage.iter = 0
        trainer.run_step()
        trainer.iter = trainer.storage.iter = 1
        tracker = SyncTracker(_device_tensors(model, optimizer))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with tracker:
                trainer.run_step()
    return tracker, _profiled_syncs(prof)


@pytest.fixture(scope="module")
def steps():
    return {(b, q): measure_step(b, q) for b, q in [(1, 4), (3, 4), (1, 12)]}


def test_a_training_step_waits_for_the_device_a_fixed_few_times(steps):
    tracker, profiled = steps[(1, 4)]
    report = tracker.report()
    assert tracker.total() <= MAX_SYNCS_PER_STEP, report
    assert "mixed" not in tracker.counts(), report
    # What is left, and where: the matcher's cost copies (ours) and the pixel decoder's level
    # sizes (see the module docstring).
    assert tracker.files("d2h") <= {"matcher.py"}, report
    assert tracker.files("h2d") <= {"msdeformattn.py"}, report
    assert "shape" not in tracker.counts(), report
    matcher = sum(n for (_, _, site), n in tracker.events.items() if site.startswith("matcher.py"))
    assert matcher == DEC_LAYERS, report
    # The profiler sees the scalar reads (on the CPU a copy to the host is no event).
    assert profiled["aten::nonzero"] == 0
    assert profiled["aten::_local_scalar_dense"] == 0


def test_the_count_does_not_grow_with_the_batch_or_the_queries(steps):
    base_tracker, base_profiled = steps[(1, 4)]
    for key in [(3, 4), (1, 12)]:
        tracker, profiled = steps[key]
        assert tracker.counts() == base_tracker.counts(), (key, tracker.report())
        assert profiled == base_profiled, key


# ---------------------------------------------------------------------------------------------
# Losses stay on the device until the log period
# ---------------------------------------------------------------------------------------------
class _Regression(torch.nn.Module):
    """Fits y = 3x - 1; returns a loss dict like a pix2cap model in training mode (the loss
    is ``inf`` from iteration ``bad_from`` on)."""

    def __init__(self, bad_from=None):
        super().__init__()
        self.linear = torch.nn.Linear(1, 1)
        self.bad_from = bad_from
        self.calls = 0

    def forward(self, batch):
        x = torch.stack([d["x"] for d in batch])
        x = x.to(self.linear.weight.device, non_blocking=True)
        loss = ((self.linear(x) - 3 * x + 1) ** 2).mean()
        bad = self.bad_from is not None and self.calls >= self.bad_from
        self.calls += 1
        return {"loss_mse": loss, "loss_half": loss * (float("inf") if bad else 0.5)}


def _regression_trainer(metrics_period, bad_from=None):
    torch.manual_seed(0)
    model = _Regression(bad_from)
    batch = [{"x": x} for x in torch.rand(8, 1, generator=torch.Generator().manual_seed(0))]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return SimpleTrainer(model, itertools.repeat(batch), optimizer, metrics_period=metrics_period)


def _history(trainer):
    return {
        name: buffer.values()
        for name, buffer in trainer.storage.histories().items()
        if name != "data_time"
    }


def test_deferred_losses_are_recorded_as_every_step_would():
    every_step = _regression_trainer(1)
    every_step.train(0, 13)
    deferred = _regression_trainer(5)
    deferred.train(0, 13)  # 13 is no multiple of 5: the last ones are recorded at the end
    assert _history(deferred) == _history(every_step)
    assert [it for _, it in deferred.storage.history("total_loss").values()] == list(range(13))


def test_a_step_between_log_periods_reads_no_loss():
    trainer = _regression_trainer(4)
    seeds = list(trainer.model.parameters())
    with EventStorage(0) as trainer.storage:
        trackers = []
        for it in range(4):
            trainer.iter = trainer.storage.iter = it
            tracker = SyncTracker(seeds)
            with tracker:
                trainer.run_step()
            trackers.append(tracker)
        # Iterations 0-2 keep their losses on the device; 3 reads all four in one copy.
        assert [t.total() for t in trackers] == [0, 0, 0, 1], [t.report() for t in trackers]
        assert trackers[3].files() == {"events.py"}
        assert len(trainer.storage.history("loss_mse").values()) == 4
        # Reading the storage (writers, checkpoints) records what is pending first.
        trainer.iter = trainer.storage.iter = 4
        trainer.run_step()
        assert trainer.storage.state_dict()["loss_mse"]["iterations"] == [0, 1, 2, 3, 4]


def test_non_finite_loss_is_reported_at_the_period_with_its_iteration():
    trainer = _regression_trainer(5, bad_from=7)
    after_train = []
    trainer.register_hooks([hooks.CallbackHook(after_train=lambda t: after_train.append(t.iter))])
    with pytest.raises(FloatingPointError, match=r"iteration=7 .*loss_half=inf"):
        trainer.train(0, 20)
    # Raised at the first check after it (iteration 9, before its backward); the iterations
    # before the bad one are recorded.
    assert after_train == [9]
    assert [it for _, it in trainer.storage.history("loss_mse").values()] == list(range(7))


def test_put_deferred_records_at_its_iteration_on_read():
    with EventStorage(3) as storage:
        seen = []

        def record(values):
            seen.append((storage.iter, values))
            storage.put_scalar("a", values[0])

        storage.put_deferred(torch.tensor([1.5, 2.0]), record)
        storage.iter = 4
        storage.put_deferred(torch.tensor(2.5), record)
        storage.iter = 7
        assert not seen
        assert storage.history("a").values() == [(1.5, 3), (2.5, 4)]
        assert seen == [(3, [1.5, 2.0]), (4, [2.5])] and storage.iter == 7
        assert storage.latest()["a"] == (2.5, 4)
