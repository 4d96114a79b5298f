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


def test_storage_state_restores_recent_history_but_not_latest_values():
    with EventStorage() as storage:
        for i, value in enumerate([5.0, 1.0, 2.0, 9.0]):
            storage.iter = i
            storage.put_scalar("loss", value)
        storage.put_scalar("lr", 0.1, smoothing_hint=False)
        state = storage.state_dict(max_length=3)
    assert state == {
        "loss": {"values": [1.0, 2.0, 9.0], "iterations": [1, 2, 3], "smoothing_hint": True},
        "lr": {"values": [0.1], "iterations": [3], "smoothing_hint": False},
    }
    with EventStorage(start_iter=4) as resumed:
        resumed.load_state_dict(state)
        assert resumed.latest() == {}  # nothing of an earlier iteration is written again
        resumed.put_scalar("loss", 3.0)
        # The median window reaches back into the restored history.
        assert resumed.latest_with_smoothing_hint(window_size=3) == {"loss": (3.0, 4)}
        assert resumed.latest_with_smoothing_hint(window_size=4)["loss"] == (2.5, 4)
        with pytest.raises(ValueError, match="smoothing_hint"):
            resumed.put_scalar("lr", 0.1)


def test_json_writer_start_keeps_only_the_rows_before_the_start(tmp_path):
    path = tmp_path / "metrics.json"
    rows = [json.dumps({"iteration": i, "loss": float(i)}) for i in range(6)]
    # A run killed mid-write can leave a torn last line.
    path.write_text("\n".join(rows) + '\n{"iteration": 6, "lo')
    writer = JSONWriter(str(path), window_size=1)
    writer.start(7)
    writer.close()
    assert path.read_text().splitlines() == rows
    writer = JSONWriter(str(path), window_size=1)
    writer.start(3)
    assert path.read_text().splitlines() == rows[:3]
    with EventStorage(start_iter=3) as storage:
        storage.put_scalar("loss", 30.0)
        writer.write()
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()][2:] == [
        {"iteration": 2, "loss": 2.0},
        {"iteration": 3, "loss": 30.0},
    ]
    assert os.listdir(tmp_path) == ["metrics.json"]  # written atomically, no temporary left
    # A run from iteration 0 starts the file afresh.
    writer = JSONWriter(str(path))
    writer.start(0)
    writer.close()
    assert path.read_text() == ""


def test_tensorboard_writer_start_hides_what_an_earlier_run_logged_from_there(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(start_iter, stop_iter, offset):
        writer = TensorboardXWriter(str(tmp_path), window_size=1)
        writer.start(start_iter)
        with EventStorage(start_iter) as storage:
            for i in range(start_iter, stop_iter):
                storage.iter = i
                storage.put_scalar("loss", offset + i)
                writer.write()
        writer.close()

    run(0, 6, offset=0.0)
    run(3, 5, offset=100.0)  # resumed at iteration 3
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    logged = [(e.step, e.value) for e in accumulator.Scalars("loss")]
    assert logged == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 103.0), (4, 104.0)]
