#!/usr/bin/env python
"""PancapScore of predicted panoptic captions against SA-Pancap-style ground truth.

    python tools/eval_pancapscore.py --pred pred.json --gt sapancap_val_gtcaption.json \\
        --output pancapscore.json                                   # no language model
    python tools/eval_pancapscore.py --pred pred.json --gt gt.json --judge openai_http \\
        --base-url http://127.0.0.1:8000/v1 --judge-model Qwen2.5-14B-Instruct \\
        --embedder /models/all-mpnet-base-v2 --output pancapscore.json
    python tools/eval_pancapscore.py --pred pred.json --gt gt.json --judge hf_local \\
        --judge-model /models/Qwen2.5-14B-Instruct --output pancapscore.json

Inputs: ground truth ``[{"image_path", "gt_response"}]`` (the official file) and predictions
``[{"image_path", "model_response", "structured"?}]``, paired by ``image_path``; or, with
``--pancapchain-dir DIR --image-root ROOT``, PancapChain's own prediction folder (one JSON per
image, boxes on the 0-1000 grid of the padded square), read as the authors'
``agg_jsons_asv2togt.py`` aggregates it (``pix2cap.evaluation.pancapscore.pancapchain``). The
optional ``structured`` field is pix2cap's own content (dict form of
``PanopticContent.from_dict``). A ground-truth image without a prediction is scored against
an empty caption; a prediction without ground truth is ignored (both are counted and logged).

Extractors (``--extractor`` for predictions, ``--gt-extractor`` for ground truth): ``auto``
uses the ``structured`` field when a prediction has one, else ``llm`` with a language-model
judge, else ``heuristic``; ``lines`` reads texts that already are extraction lines (the
official content files: ``--gt-key all_content --pred-key all_content``), so two scorers can
be compared on identical lines.

``--protocol official`` (default) reads lines, compares names and averages empty sides as the
authors' scorer does (``pix2cap.evaluation.pancapscore.protocol``); ``--protocol lenient`` is
pix2cap's tolerant reading for free-form extractors. Only the official protocol with ``llm``
extraction + an ``hf_local``/``openai_http`` judge + the all-mpnet-base-v2 embedder + WordNet
is the official setup; any other run is labelled an approximation in the output
(``setup.official`` and ``setup.approximation_note``).

Output (written atomically): ``{"setup", "mean": {E, L, A, R, G, Overall, ...},
"per_image": [...], "judge_stats", "missing_predictions", "unmatched_predictions",
"failed_images", "resumed_images"}``; a table of the means is printed. An existing output is
not replaced without ``--overwrite``; the output's folder is checked before anything is scored.

Each image's scores are appended, as it is scored, to ``<output stem>.jsonl`` (one line per
image, flushed), and ``<output stem>.summary.json`` records the run's settings and, at the end,
its counts. A run that was interrupted (no output yet) continues when rerun with the same
command: the images in the ``.jsonl`` are not scored again (except those whose judge could not
be reached), provided the inputs (their contents) and the scoring flags are those of the first
run; ``--overwrite`` starts over. An image whose scoring fails (e.g. a malformed ``structured``
field) is left out of the means and listed in ``failed_images``; the tool then exits with an
error after writing the output.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Optional

from pix2cap.evaluation.pancapscore import (
    PROTOCOLS,
    PancapScorer,
    SentenceTransformerEmbedder,
    build_judge,
    load_wordnet,
)
from pix2cap.data.errors import DatasetError
from pix2cap.evaluation.pancapscore.extractors import extractor_for
from pix2cap.evaluation.pancapscore.pancapchain import read_pancapchain_folder
from pix2cap.evaluation.pancapscore.score import format_table, summarize
from pix2cap.utils.cli import UsageError, add_verbose_flag, check_output_file, main_guard
from pix2cap.utils.file_io import atomic_write_json
from pix2cap.utils.streaming import ResumableRun

logger = logging.getLogger("pix2cap.eval_pancapscore")


def _load_entries(path: str, text_key: str, what: str) -> dict[str, dict]:
    """``{normalised image_path: entry}`` from a JSON list; clear errors name the file."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the {what} file ({e.strerror or e})") from None
    except ValueError as e:
        raise SystemExit(f"{path}: the {what} file is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise SystemExit(f"{path}: the {what} file must be a JSON list of objects")
    entries: dict[str, dict] = {}
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise SystemExit(f"{path}: entry [{i}] is not a JSON object")
        for key in ("image_path", text_key):
            if key not in entry:
                raise SystemExit(f"{path}: entry [{i}] has no key {key!r}")
        if not isinstance(entry[text_key], str):
            raise SystemExit(f"{path}: entry [{i}]: {text_key!r} is not a string")
        structured = entry.get("structured")
        if structured is not None and not isinstance(structured, dict):
            raise SystemExit(f"{path}: entry [{i}]: 'structured' must be an object")
        key = os.path.normpath(str(entry["image_path"]).replace("\\", "/"))
        if key in entries:
            raise SystemExit(f"{path}: entry [{i}]: image {entry['image_path']!r} appears twice")
        entries[key] = entry
    return entries


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pred = p.add_mutually_exclusive_group(required=True)
    pred.add_argument("--pred", help="predictions JSON ([{image_path, model_response}])")
    pred.add_argument(
        "--pancapchain-dir",
        help="a PancapChain prediction folder (one JSON per image, grid boxes), read as the "
        "authors' agg_jsons_asv2togt.py aggregates it; needs --image-root",
    )
    p.add_argument("--image-root", help="with --pancapchain-dir: the data root of its 'image' paths")
    p.add_argument("--gt", required=True, help="ground-truth JSON (official SA-Pancap file)")
    p.add_argument("--gt-key", default="gt_response",
                   help="the ground-truth entries' text key (all_content for content files)")
    p.add_argument("--pred-key", default="model_response",
                   help="the predictions' text key (all_content for content files)")
    p.add_argument("--protocol", default="official", choices=list(PROTOCOLS),
                   help="how lines are read, names compared and empty sides averaged")
    p.add_argument("--output", required=True, help="where to write the result JSON")
    p.add_argument("--judge", default="structured",
                   choices=["structured", "hf_local", "openai_http"])
    p.add_argument("--extractor", default="auto",
                   choices=["auto", "llm", "lines", "structured", "heuristic"],
                   help="content extractor for predictions")
    p.add_argument("--gt-extractor", default="auto",
                   choices=["auto", "llm", "lines", "heuristic"],
                   help="content extractor for the ground truth")
    p.add_argument("--judge-model", default=None,
                   help="hf_local: local model folder; openai_http: model name")
    p.add_argument("--base-url", default=None, help="openai_http: e.g. http://host:8000/v1")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="openai_http: environment variable with the API key")
    p.add_argument("--timeout", type=float, default=120.0, help="openai_http: seconds/request")
    p.add_argument("--retries", type=int, default=3, help="openai_http: retries per request")
    p.add_argument("--device", default=None, help="hf_local: torch device")
    p.add_argument("--batch-size", type=int, default=16, help="questions per judge prompt")
    p.add_argument("--embedder", default=None,
                   help="local sentence-transformers folder (default: packaged all-MiniLM-L6-v2)")
    p.add_argument("--no-embedder", action="store_true",
                   help="skip the embedding rule of entity matching")
    p.add_argument("--similarity-threshold", type=float, default=0.85,
                   help="structured judge: cosine for a paraphrase to count")
    p.add_argument("--limit", type=int, default=None, help="score only the first N images")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output, and start over instead of continuing an "
                   "interrupted run")
    add_verbose_flag(p)
    return p


# The flags that change an image's scores; a continued run must have the same ones.
SCORING_FLAGS = (
    "gt_key", "pred_key", "protocol", "judge", "extractor", "gt_extractor", "judge_model",
    "base_url", "batch_size", "embedder", "no_embedder", "similarity_threshold", "image_root",
)


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _folder_listing(folder: str) -> list:
    """Name, size and time of each file of a PancapChain folder: a changed file changes it."""
    listing = []
    for name in sorted(os.listdir(folder)):
        st = os.stat(os.path.join(folder, name))
        listing.append([name, st.st_size, st.st_mtime_ns])
    return listing


def scoring_settings(args) -> dict:
    """What determines the scores: the inputs' contents and :data:`SCORING_FLAGS`."""
    settings = {name: getattr(args, name) for name in SCORING_FLAGS}
    settings["gt_sha256"] = _sha256_file(args.gt)
    if args.pancapchain_dir:
        settings["pancapchain_dir"] = _folder_listing(args.pancapchain_dir)
    else:
        settings["pred_sha256"] = _sha256_file(args.pred)
    return settings


def stream_paths(output: str) -> tuple[str, str]:
    """The per-image ``.jsonl`` and the run summary beside the result file ``output``."""
    base = output[: -len(".json")] if output.endswith(".json") else output
    return base + ".jsonl", base + ".summary.json"


def _check_usage(args) -> None:
    """Flag combinations argparse cannot check; before any file is read."""
    if args.pancapchain_dir and not args.image_root:
        raise UsageError("--pancapchain-dir needs --image-root (the images give the sizes)")
    if args.judge == "hf_local" and not args.judge_model:
        raise UsageError("--judge hf_local needs --judge-model <local model folder>")
    if args.judge == "openai_http" and (not args.base_url or not args.judge_model):
        raise UsageError("--judge openai_http needs --base-url and --judge-model")
    if "llm" in (args.extractor, args.gt_extractor) and args.judge == "structured":
        raise UsageError("--extractor llm needs --judge hf_local or openai_http")


def _image_key(image_path) -> str:
    return os.path.normpath(str(image_path).replace("\\", "/"))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _check_usage(args)

    gt = _load_entries(args.gt, args.gt_key, "ground-truth")
    if args.pancapchain_dir:
        try:
            entries = read_pancapchain_folder(args.pancapchain_dir, args.image_root)
        except DatasetError as e:
            raise SystemExit(str(e)) from None
        pred = {_image_key(e["image_path"]): e for e in entries}
        source = args.pancapchain_dir
        pred_key = "model_response"  # the reader's form, whatever --pred-key says
    else:
        pred = _load_entries(args.pred, args.pred_key, "prediction")
        source = args.pred
        pred_key = args.pred_key

    # Before the judge is built and anything is scored: the output can be written.
    check_output_file(args.output, overwrite=args.overwrite)
    jsonl_path, summary_path = stream_paths(args.output)
    run = ResumableRun(
        jsonl_path,
        summary_path,
        tool="eval_pancapscore",
        settings=scoring_settings(args),
        key=lambda record: _image_key(record["image_path"]),
        overwrite=args.overwrite,
        outputs=(args.output,),
    )

    embedder = None
    if not args.no_embedder:
        embedder = SentenceTransformerEmbedder(args.embedder, device=args.device)
    if args.judge == "structured":
        judge = build_judge("structured", embedder=embedder, threshold=args.similarity_threshold)
    elif args.judge == "hf_local":
        judge = build_judge("hf_local", model=args.judge_model, device=args.device,
                            batch_size=args.batch_size)
    else:
        judge = build_judge("openai_http", base_url=args.base_url, model=args.judge_model,
                            api_key_env=args.api_key_env, timeout=args.timeout,
                            retries=args.retries, batch_size=args.batch_size)

    try:
        gt_extractor = extractor_for(args.gt_extractor, judge, for_gt=True, protocol=args.protocol)
    except ValueError as e:
        raise UsageError(f"--gt-extractor {args.gt_extractor}: {e}") from None
    scorer = PancapScorer(
        judge=judge,
        gt_extractor=gt_extractor,
        pred_extractor=extractor_for(args.extractor, judge, for_gt=False, protocol=args.protocol),
        embedder=embedder,
        synonyms=load_wordnet(),
        protocol=args.protocol,
    )
    keys = list(gt)
    if args.limit is not None:
        keys = keys[: args.limit]
    missing = [gt[k]["image_path"] for k in keys if k not in pred]
    unmatched = [pred[k]["image_path"] for k in pred if k not in gt]
    if missing:
        logger.warning("%d ground-truth images have no prediction; scored as empty captions",
                       len(missing))
    if unmatched:
        logger.warning("%d predictions have no ground truth; ignored", len(unmatched))

    def finished(k: str) -> bool:
        # An image whose judge could not be reached is scored again.
        return run.is_done(k) and not run.get(k).get("skipped")

    todo = [k for k in keys if not finished(k)]
    with run:
        for n, k in enumerate(todo):
            entry = pred.get(k, {})
            with run.attempt(gt[k]["image_path"]):
                try:
                    scores = scorer.score_image(
                        gt[k][args.gt_key],
                        entry.get(pred_key, ""),
                        entry.get("structured"),
                        image_path=gt[k]["image_path"],
                    )
                except ValueError as e:
                    raise ValueError(f"{source}: {e}") from e
                run.append(scores)
            if (n + 1) % 50 == 0:
                logger.info("scored %d / %d images", n + 1, len(todo))
    per_image = [run.get(k) for k in keys if run.is_done(k)]
    result = {
        "protocol": scorer.protocol,
        "setup": scorer.setup.as_dict(),
        "mean": summarize(per_image),
        "per_image": per_image,
        "judge_stats": dict(judge.stats),
        "missing_predictions": missing,
        "unmatched_predictions": unmatched,
        "failed_images": list(run.failures),
        "resumed_images": len(keys) - len(todo),
    }
    atomic_write_json(args.output, result, indent=2)
    run.finish(total=len(keys), resumed=len(keys) - len(todo), output=args.output)
    print(format_table(result["mean"]))
    if not result["setup"]["official"]:
        print(result["setup"]["approximation_note"])
    print(f"wrote {args.output}")
    run.raise_for_failures(len(keys), path=args.output)
    return result


if __name__ == "__main__":
    main_guard(main, sys.argv[1:])
