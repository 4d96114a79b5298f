#!/usr/bin/env python
"""Peak memory of the demo on large photos (a script, not a test: RSS depends on the machine).

    python tools/benchmark_memory.py
    python tools/benchmark_memory.py --repo /tmp/pix2cap_before     # another checkout's code

For each size (default 1, 12 and 108 megapixels, 4:3) it writes a synthetic JPEG photo and runs
the real demo entry, ``tools/demo.py``, on it in a fresh process (the model of
``--config-file`` with ``--weights``), then reports:

* ``peak RSS``: the process's peak resident set size (``os.wait4``'s ``ru_maxrss``, one child
  at a time);
* ``run peak``: the peak before the interpreter shuts down (``VmHWM`` read by the last
  ``atexit`` handler). A CUDA build of torch pages in about 130 MiB of its libraries while it
  shuts down, after the work is done; this column leaves that out;
* the wall time, and whether the run succeeded (else the last line it printed).

A run first measures the same demo on a 256 x 192 image: what the interpreter, the libraries
and the model take whatever the image; the ``image`` column is the run peak above it.

``--repo`` runs the demo, config and weights of another checkout of this repository (its
``pix2cap`` comes first on ``PYTHONPATH``), so the numbers before and after a change can be
taken from one script. ``--max-memory-gb`` caps each child's address space, so a run that would
exhaust the machine fails with an allocation error instead.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SIZES = ("1152x864", "4000x3000", "12000x9000")
BASELINE_SIZE = "256x192"


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", default=_REPO, help="checkout whose tools/demo.py and pix2cap run")
    parser.add_argument("--config-file", default="configs/shapes/pix2cap_effl0.yaml",
                        help="relative to --repo")
    parser.add_argument("--weights", default="model_zoo/shapes/pix2cap_effl0.safetensors",
                        help="relative to --repo")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=list(DEFAULT_SIZES),
                        help="WIDTHxHEIGHT of each synthetic photo")
    parser.add_argument("--max-memory-gb", type=float, default=10.0,
                        help="address-space limit of each demo process (0: none)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per demo run")
    parser.add_argument("--output", default="", help="also write the results here as JSON")
    return parser


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` -> ``(width, height)``."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size WIDTHxHEIGHT, e.g. 4000x3000")
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return width, height


def synthetic_photo(path: str, width: int, height: int, seed: int = 0) -> None:
    """A JPEG with a sky-to-ground gradient, a horizon and a few filled shapes.

    Drawn in horizontal bands so writing a 108-megapixel photo does not itself need several
    float copies of it in this process."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), dtype=np.uint8)
    horizon = height // 2
    band = 1024
    for y0 in range(0, height, band):
        ys = np.arange(y0, min(y0 + band, height), dtype=np.float32)[:, None]
        sky = ys < horizon
        t = np.where(sky, ys / max(horizon, 1), (ys - horizon) / max(height - horizon, 1))
        r = np.where(sky, 120 + 60 * t, 40 + 30 * t)
        g = np.where(sky, 170 + 40 * t, 140 - 40 * t)
        b = np.where(sky, 235 - 20 * t, 50 + 10 * t)
        rows = np.stack(np.broadcast_arrays(r, g, b), axis=-1)  # [band, 1, 3]
        image[y0 : y0 + len(ys)] = np.broadcast_to(rows, (len(ys), width, 3)).astype(np.uint8)
    scale = min(width, height)
    for _ in range(5):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = int(rng.uniform(0.15, 0.85) * width), int(rng.uniform(0.3, 0.85) * height)
        size = int(rng.uniform(0.06, 0.15) * scale)
        if rng.random() < 0.5:
            cv2.circle(image, (cx, cy), size, color, thickness=-1)
        else:
            cv2.rectangle(image, (cx - size, cy - size), (cx + size, cy + size), color, -1)
    # OpenCV writes BGR; the colours only need to be plausible.
    if not cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90]):
        raise OSError(f"could not write {path}")


# Runs the demo as its own __main__ and, last thing before the interpreter shuts down (the
# first atexit handler registered runs last), writes the process's peak RSS in KiB to a file.
_BOOTSTRAP = """
import atexit, runpy, sys
def _report(path=sys.argv[1]):
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    with open(path, "w") as f:
        f.write(peak)
atexit.register(_report)
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def _limit_address_space(max_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))

    return apply


def run_demo(args, image: str, output_dir: str) -> dict:
    """Run ``tools/demo.py`` of ``args.repo`` on one image in a fresh process.

    Returns:
        ``{"peak_rss_mib", "run_peak_mib", "wall_s", "ok", "message"}``; ``run_peak_mib`` is
        None when the process died before its atexit handlers; ``message`` is the last line
        the process printed when it failed.
    """
    repo = os.path.abspath(args.repo)
    env = dict(os.environ)
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    # The demo only reads the test set's metadata; the shapes data need not exist in --repo.
    env.setdefault("PIX2CAP_DATASETS", os.path.join(_REPO, "datasets"))
    peak_file = os.path.join(output_dir + ".peak")
    command = [
        sys.executable,
        "-c",
        _BOOTSTRAP,
        peak_file,
        os.path.join(repo, "tools", "demo.py"),
        "--config-file", args.config_file,
        "--input", image,
        "--output", output_dir,
        "MODEL.WEIGHTS", args.weights,
    ]
    limit = int(args.max_memory_gb * 2**30) if args.max_memory_gb > 0 else None
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        process = subprocess.Popen(
            command,
            cwd=repo,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit_address_space(limit) if limit else None,
        )
        deadline = start + args.timeout
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all).
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        log.seek(0)
        lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    ok = process.returncode == 0
    message = "" if ok else (lines[-1] if lines else f"exit status {process.returncode}")
    run_peak = None
    if os.path.isfile(peak_file):
        with open(peak_file) as f:
            run_peak = int(f.read()) / 1024.0
    return {
        "peak_rss_mib": usage.ru_maxrss / 1024.0,  # Linux reports KiB
        "run_peak_mib": run_peak,
        "wall_s": wall,
        "ok": ok,
        "message": message,
    }


def _mib(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def main(args) -> list[dict]:
    # Defaults arrive as "WxH" strings (argparse does not convert a list default).
    sizes = [BASELINE_SIZE, *args.sizes]
    results = []
    with tempfile.TemporaryDirectory(prefix="pix2cap_memory_") as tmp:
        for size in sizes:
            width, height = parse_size(size) if isinstance(size, str) else size
            image = os.path.join(tmp, f"photo_{width}x{height}.jpg")
            synthetic_photo(image, width, height)
            out = os.path.join(tmp, f"out_{width}x{height}")
            result = {"size": f"{width}x{height}", "megapixels": width * height / 1e6}
            result.update(run_demo(args, image, out))
            results.append(result)
            print(
                f"{result['size']:>12} {result['megapixels']:7.2f} MP  "
                f"peak RSS {result['peak_rss_mib']:6.0f} MiB  run peak "
                f"{_mib(result['run_peak_mib'])} MiB  {result['wall_s']:6.1f} s  "
                + ("ok" if result["ok"] else f"FAILED: {result['message']}"),
                flush=True,
            )
    base = results[0]["run_peak_mib"]
    print()
    print(f"demo memory, code of {os.path.abspath(args.repo)}:")
    print("| image | megapixels | peak RSS (MiB) | run peak (MiB) | image (MiB) | wall (s) | result |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        status = "ok" if r["ok"] else f"failed: {r['message'][:120]}"
        above = None if r["run_peak_mib"] is None or base is None else r["run_peak_mib"] - base
        print(
            f"| {r['size']} | {r['megapixels']:.2f} | {r['peak_rss_mib']:.0f} | "
            f"{_mib(r['run_peak_mib'])} | {_mib(above)} | {r['wall_s']:.1f} | {status} |"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"repo": os.path.abspath(args.repo), "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main(get_parser().parse_args())
