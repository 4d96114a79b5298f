import json
import logging
import os

import pytest

from pix2cap.utils.events import (
    CommonMetricPrinter,
    EventStorage,
    JSONWriter,
    TensorboardXWriter,
    get_event_storage,
)


def test_storage_records_history_latest_and_iteration():
    with EventStorage(start_iter=5) as storage:
        assert get_event_storage() is storage
        storage.put_scalar("loss", 3.0)
        storage.step()
        storage.put_scalars(loss=1.0, acc=0.5)
        assert storage.iter == 6
        assert storage.history("loss").values() == [(3.0, 5), (1.0, 6)]
        assert storage.latest() == {"loss": (1.0, 6), "acc": (0.5, 6)}
        storage.put_scalar("lr", 0.1, smoothing_hint=False)
        assert storage.smoothing_hints() == {"loss": True, "acc": True, "lr": False}
    with pytest.raises(RuntimeError, match="outside an EventStorage"):
        get_event_storage()


def test_smoothing_uses_the_window_median_and_hints_must_agree():
    with EventStorage() as storage:
        for i, value in enumerate([1.0, 100.0, 2.0, 3.0]):
            storage.iter = i
            storage.put_scalar("loss", value)
            storage.put_scalar("lr", value, smoothing_hint=False)
        smoothed = storage.latest_with_smoothing_hint(window_size=3)
        assert smoothed["loss"] == (3.0, 3)  # median of [100, 2, 3]
        assert smoothed["lr"] == (3.0, 3)  # raw latest value
        with pytest.raises(ValueError, match="smoothing_hint"):
            storage.put_scalar("lr", 1.0, smoothing_hint=True)
        with pytest.raises(KeyError, match="recorded"):
            storage.history("nope")


def test_json_writer_writes_each_iteration_once(tmp_path):
    path = tmp_path / "metrics.json"
    writer = JSONWriter(str(path), window_size=1)
    with EventStorage() as storage:
        storage.put_scalar("loss", 2.0)
        storage.step()
        storage.put_scalar("loss", 1.0)
        writer.write()
        writer.write()  # nothing new: must not duplicate lines
        storage.step()
        storage.put_scalar("loss", 0.5)
        writer.write()
    writer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    # Only the latest value per metric is kept in memory, so iteration 0 is superseded.
    assert lines == [{"iteration": 1, "loss": 1.0}, {"iteration": 2, "loss": 0.5}]


def test_common_metric_printer_prints_progress_eta_and_losses(caplog):
    printer = CommonMetricPrinter(max_iter=100, window_size=2)
    with EventStorage(start_iter=49) as storage, caplog.at_level(logging.INFO):
        storage.put_scalars(loss_a=1.0, time=0.5, data_time=0.1)
        storage.put_scalar("lr", 0.01, smoothing_hint=False)
        printer.write()
    line = caplog.records[-1].getMessage()
    assert "iter: 49/100" in line
    assert "50%" in line and "#" in line
    assert "eta: 0:00:25" in line  # 50 remaining iterations * 0.5 s
    assert "loss_a: 1" in line and "lr: 0.01" in line and "data_time: 0.1000" in line


def test_tensorboard_writer_creates_event_file(tmp_path):
    writer = TensorboardXWriter(str(tmp_path))
    with EventStorage() as storage:
        storage.put_scalar("loss", 1.0)
        writer.write()
    writer.close()
    files = os.listdir(tmp_path)
    assert any(f.startswith("events.out.tfevents") for f in files)
    assert sum(os.path.getsize(tmp_path / f) for f in files) > 0
