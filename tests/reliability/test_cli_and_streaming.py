"""The tools' shared pieces in-process: the one-line error guard (``pix2cap.utils.cli``) and
resumable JSON-lines outputs (``pix2cap.utils.streaming``)."""

from __future__ import annotations

import json
import logging

import pytest

from pix2cap.data.errors import DatasetError
from pix2cap.utils.cli import (
    OutputPathError,
    UsageError,
    check_output_dir,
    check_output_file,
    error_message,
    main_guard,
)
from pix2cap.utils.streaming import (
    ImagesFailedError,
    JsonLinesWriter,
    ResumableRun,
    read_json_lines,
)


# --------------------------------------------------------------------------------------------
# error_message
# --------------------------------------------------------------------------------------------
def test_error_message_forms():
    assert error_message(DatasetError("data/a.json", "no key 'images'")) == (
        "data/a.json: no key 'images'"
    )
    assert error_message(FileNotFoundError(2, "No such file or directory", "cfg.yaml")) == (
        "cfg.yaml: No such file or directory"
    )
    assert error_message(KeyError("Dataset 'x' is not registered")) == (
        "Dataset 'x' is not registered"
    )
    # Not an input error: the type says what kind of failure it was.
    assert error_message(RuntimeError("CUDA out of memory")) == "RuntimeError: CUDA out of memory"
    assert error_message(AssertionError()) == "AssertionError"
    assert error_message(ValueError("two\n  lines")) == "two lines"


def test_error_message_of_a_reraised_worker_error_is_the_original_line():
    # What torch's DataLoader raises for a worker's DatasetError: the class called with the
    # worker's formatted traceback.
    wrapped = DatasetError(
        "Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "mapper.py", line 3, in __call__\n    image = read_image(f)\n'
        "pix2cap.data.errors.DatasetError: images/7.jpg: corrupt or truncated image file\n"
    )
    assert error_message(wrapped) == "images/7.jpg: corrupt or truncated image file"
    spawned = RuntimeError(
        "\n\n-- Process 0 terminated with the following error:\nTraceback (most recent call "
        'last):\n  File "x.py", line 1\nZeroDivisionError: division by zero\n'
    )
    assert error_message(spawned) == "ZeroDivisionError: division by zero"


# --------------------------------------------------------------------------------------------
# main_guard
# --------------------------------------------------------------------------------------------
def _exit_of(main, *args, **kwargs) -> int:
    with pytest.raises(SystemExit) as info:
        main_guard(main, *args, **kwargs)
    return info.value.code


def _raise(exc):
    def main(*args):
        raise exc

    return main


def test_guard_exit_codes_and_one_line(capsys):
    assert _exit_of(lambda argv: {"result": 1}, []) == 0
    assert _exit_of(lambda argv: 3, []) == 3
    assert _exit_of(_raise(DatasetError("a.json", "not a list")), []) == 1
    assert capsys.readouterr().err == "error: a.json: not a list\n"
    assert _exit_of(_raise(SystemExit("b.json: entry [0] has no key 'x'")), []) == 1
    assert capsys.readouterr().err == "error: b.json: entry [0] has no key 'x'\n"
    assert _exit_of(_raise(UsageError("--a needs --b")), []) == 2
    assert capsys.readouterr().err == "error: --a needs --b\n"
    assert _exit_of(_raise(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "error: interrupted\n"
    # argparse's own exit (after its usage message) passes through untouched.
    assert _exit_of(_raise(SystemExit(2)), []) == 2
    assert capsys.readouterr().err == ""


def test_guard_traceback_goes_to_the_log_file_or_with_verbose_to_stderr(tmp_path, capsys):
    log = logging.getLogger("pix2cap")
    handler = logging.FileHandler(tmp_path / "log.txt")
    log.addHandler(handler)
    try:
        assert _exit_of(_raise(ValueError("c.yaml: bad value")), ["--x"]) == 1
    finally:
        log.removeHandler(handler)
        handler.close()
    err = capsys.readouterr().err
    assert err == "error: c.yaml: bad value\n"
    text = (tmp_path / "log.txt").read_text()
    assert "Traceback (most recent call last)" in text and "ValueError: c.yaml: bad value" in text

    assert _exit_of(_raise(ValueError("c.yaml: bad value")), ["--verbose"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)")
    assert err.splitlines()[-1] == "error: c.yaml: bad value"


# --------------------------------------------------------------------------------------------
# output checks
# --------------------------------------------------------------------------------------------
def test_output_checks(tmp_path):
    check_output_dir(str(tmp_path / "new" / "deeper"))  # creatable: fine, nothing created
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="file: the output folder is a file"):
        check_output_dir(str(tmp_path / "file"))
    with pytest.raises(OutputPathError, match="cannot create the output folder: .*file is a file"):
        check_output_dir(str(tmp_path / "file" / "sub"))
    with pytest.raises(OutputPathError, match="output file exists; pass --overwrite"):
        check_output_file(str(tmp_path / "file"))
    check_output_file(str(tmp_path / "file"), overwrite=True)
    with pytest.raises(OutputPathError, match="is a folder"):
        check_output_file(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # no probe left behind


# --------------------------------------------------------------------------------------------
# JSON lines and ResumableRun
# --------------------------------------------------------------------------------------------
def test_read_json_lines_drops_a_cut_last_line_and_rejects_a_bad_one(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"k": 1}\n{"k": 2}\n{"k": 3')
    objects, valid, partial = read_json_lines(str(path))
    assert objects == [{"k": 1}, {"k": 2}] and partial and valid == len('{"k": 1}\n{"k": 2}\n')
    # A complete last line without its newline is dropped too: the kill may have come just
    # before the newline was written.
    path.write_text('{"k": 1}\n{"k": 2}')
    assert read_json_lines(str(path))[0] == [{"k": 1}]
    path.write_text('{"k": 1}\n[1, 2]\n')
    with pytest.raises(OutputPathError, match="a.jsonl: line 2 is not a JSON object"):
        read_json_lines(str(path))


def test_one_writer_at_a_time(tmp_path):
    path = str(tmp_path / "a.jsonl")
    with JsonLinesWriter(path) as writer:
        assert writer.write({"t": (1, 2)}) == {"t": [1, 2]}  # as it reads back
        with pytest.raises(OutputPathError, match="another run is writing to this file"):
            JsonLinesWriter(path)
    assert (tmp_path / "a.jsonl").read_text() == '{"t": [1, 2]}\n'


def _run(tmp_path, settings=None, **kwargs):
    return ResumableRun(
        str(tmp_path / "r.jsonl"), str(tmp_path / "summary.json"), tool="t",
        settings=settings or {"writer": "template", "threshold": 0.5},
        key=lambda r: r["image"], **kwargs,
    )


def test_resumable_run_continues_counts_failures_and_checks_settings(tmp_path):
    run = _run(tmp_path)
    with run:
        for image in ("a", "b", "c"):
            with run.attempt(image):
                if image == "b":
                    raise RuntimeError("model failed")
                run.append({"image": image, "value": ord(image)})
    summary = run.finish(total=3, resumed=0)
    assert (summary["status"], summary["done"], summary["failed"]) == ("incomplete", 2, 1)
    assert summary["failures"] == [{"image": "b", "error": "RuntimeError: model failed"}]
    with pytest.raises(ImagesFailedError, match=r"summary.json: 1 of 3 image\(s\) failed .*b: "):
        run.raise_for_failures(3, input_error=DatasetError)  # not an input error

    # Killed while writing a fourth line: the rerun drops it and skips a and c.
    with open(tmp_path / "r.jsonl", "a") as f:
        f.write('{"image": "d", "val')
    again = _run(tmp_path)
    assert [again.is_done(k) for k in "abcd"] == [True, False, True, False]
    with again:
        again.append({"image": "b", "value": 98})
    again.finish(total=3, resumed=2)
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    assert [json.loads(line)["image"] for line in lines] == ["a", "c", "b"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "complete"

    with pytest.raises(OutputPathError, match=r"other settings \(threshold: 0.5 then, 0.7 now\)"):
        _run(tmp_path, settings={"writer": "template", "threshold": 0.7})
    fresh = _run(tmp_path, settings={"writer": "template", "threshold": 0.7}, overwrite=True)
    assert not fresh.is_done("a")
    with fresh:
        pass
    assert (tmp_path / "r.jsonl").read_text() == ""


def test_a_run_without_its_summary_is_not_continued_blindly(tmp_path):
    (tmp_path / "r.jsonl").write_text('{"image": "a"}\n')
    with pytest.raises(OutputPathError, match="summary.json is missing.*--overwrite"):
        _run(tmp_path)


def test_all_input_failures_raise_the_input_error(tmp_path):
    run = _run(tmp_path)
    with run:
        with run.attempt("x.png"):
            raise DatasetError("x.png", "corrupt image")
    expected = r"summary.json: 1 of 1 image\(s\) failed .*x.png: corrupt"
    with pytest.raises(DatasetError, match=expected):
        run.raise_for_failures(1, input_error=DatasetError)
