"""tools/benchmark_gpu.py: the plan of steps, the s/iter read from metrics.json and the summary
table (the steps themselves are the benchmarks tested in test_benchmark*.py)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    path = REPO / "tools" / "benchmark_gpu.py"
    spec = importlib.util.spec_from_file_location("pix2cap_benchmark_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seconds_per_iter_skips_warmup_and_torn_lines(tmp_path, tool):
    metrics = tmp_path / "metrics.json"
    rows = [{"iteration": i, "time": t} for i, t in enumerate([5.0, 0.3, 0.1, 0.2, 0.4])]
    rows.insert(2, {"iteration": 2, "loss": 1.0})  # a row without a step time
    metrics.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"iteration": 5, "ti')
    assert tool.seconds_per_iter(metrics, skip=1) == {"median_s_per_iter": 0.25, "logged_rows": 4}
    assert tool.seconds_per_iter(metrics, skip=9) is None
    assert tool.seconds_per_iter(tmp_path / "missing.json", skip=0) is None


def test_summary_reads_every_result_and_marks_what_is_missing(tmp_path, tool):
    (tmp_path / "inference.json").write_text(json.dumps({
        "caption_decoding_paper_size_head": {"cached_ms_per_token_step": 0.42, "speedup": 3.5},
    }))
    (tmp_path / "train_step_shapes.json").write_text(json.dumps({
        "segmentation_step_vs_huggingface": {"pix2cap_ms": 30.0, "huggingface_ms": 40.0},
        "caption_share_of_training_step": {"full_ms": 50.0, "caption_share": 0.4},
    }))
    steps = {"train_shapes": {"returncode": 0, "median_s_per_iter": 0.075}}
    summary = tool.summarize(tmp_path, steps, "cuda")
    assert summary["paper_head_decode_ms_per_token_step"] == 0.42
    assert summary["shapes_train_s_per_iter_amp"] == 0.075 and summary["shapes_train_amp"]
    assert summary["paper_segmentation_step_ms"] is None  # train_step_paper.json not written
    table = tool.markdown(summary)
    decode = "paper-size head, greedy decode step (16 objects, key/value cache)"
    assert f"| {decode} | 0.420 ms per token |" in table
    assert "| shapes config training, AMP (train_net) | 0.075 s/iter |" in table
    assert "| shapes segmentation step, pix2cap / Hugging Face | 30.0 / 40.0 ms (0.75) |" in table
    assert "| shapes full step, caption heads' share | 50.0 ms, 40.0% |" in table
    assert "not measured / not measured ms (not measured)" in table


def test_plan_runs_every_benchmark_on_the_device(tool):
    args = type("Args", (), {
        "device": "cuda", "tiny": False, "vocab_file": ".whl/vocab/vocab.txt", "output": "/o",
        "step_timeout": 100.0, "train_iters": 300, "only": None,
    })()
    plan = {name: argv for name, argv, _ in tool.plan(args)}
    assert list(plan) == ["inference", "train_step_shapes", "train_shapes", "train_step_paper"]
    for name, argv in plan.items():
        assert argv[0] == sys.executable
        assert ("--device" in argv and argv[argv.index("--device") + 1] == "cuda") or (
            argv[argv.index("MODEL.DEVICE") + 1] == "cuda"
        ), name
    train = plan["train_shapes"]
    assert train[train.index("SOLVER.AMP.ENABLED") + 1] == "True"
    assert train[train.index("SOLVER.MAX_ITER") + 1] == "300"
    paper = plan["train_step_paper"]
    assert paper[paper.index("INPUT.IMAGE_SIZE") + 1] == "1024"
    assert paper[paper.index("--batch-size") + 1] == "4"
    assert paper[paper.index("MODEL.CAPTION_HEAD.VOCAB_FILE") + 1] == ".whl/vocab/vocab.txt"
    args.only, args.device = ["train_shapes"], "cpu"
    (only,) = tool.plan(args)
    assert only[1][only[1].index("SOLVER.AMP.ENABLED") + 1] == "False"


def test_main_gives_each_step_what_is_left_of_the_total(tmp_path, tool, monkeypatch):
    calls = []

    def fake_run_step(name, argv, output, timeout):
        calls.append((name, timeout))
        return {"returncode": 0, "seconds": 0.0, "log": str(output / f"{name}.log")}

    monkeypatch.setattr(tool, "run_step", fake_run_step)
    out = tmp_path / "gpu"
    summary = tool.main(["--device", "cpu", "--tiny", "--output", str(out),
                         "--step-timeout", "50", "--total-timeout", "1000"])
    assert [name for name, _ in calls] == [
        "prepare_shapes", "inference", "train_step_shapes", "train_shapes", "train_step_paper"
    ]
    assert all(timeout == 50 for _, timeout in calls[1:])
    assert (out / "summary.md").read_text().count("not measured") >= 7  # the fake wrote nothing
    assert set(summary["steps"]) == {"inference", "train_step_shapes", "train_shapes",
                                     "train_step_paper"}

    calls.clear()
    summary = tool.main(["--device", "cpu", "--output", str(out), "--total-timeout", "5"])
    assert [name for name, _ in calls] == ["prepare_shapes"]
    assert all(step["skipped"] and step["returncode"] is None
               for step in summary["steps"].values())
