"""The shared ground-truth reader: each panoptic PNG is decoded once per evaluation for the PQ
and dense-caption evaluators, decoding runs in threads, and the numbers are those of the
serial code before the reader existed (pinned below)."""

import contextlib
import importlib.util
import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pix2cap.data.catalog import MetadataCatalog
from pix2cap.data.detection_utils import read_panoptic_png
from pix2cap.data.errors import DatasetError
from pix2cap.evaluation import ground_truth
from pix2cap.evaluation.densecap_evaluation import DenseCaptionEvaluator
from pix2cap.evaluation.ground_truth import GroundTruthReader, read_panoptic_ids
from pix2cap.evaluation.panoptic_evaluation import COCOPanopticEvaluator
from pix2cap.evaluation.pix2cap_evaluation import Pix2CapEvaluator

H, W = 48, 64
# (name, dataset id, isthing) by contiguous id.
CLASSES = [
    ("circle", 1, True), ("square", 2, True), ("star", 3, True),
    ("sky", 10, False), ("grass", 11, False), ("wall", 12, False),
]
COLOURS = ["red", "green", "blue", "white", "striped", "dotted"]
DATASET = "_ground_truth_cache_test"

# What the PQ and dense-caption evaluators reported on this fixture before the shared reader
# (serial code, each evaluator reading the PNGs itself; fake METEOR ``word_f1``).
EXPECTED_PQ = {
    "PQ": 10.997544835397822, "SQ": 44.206534321038546, "RQ": 20.634920634920633,
    "PQ_th": 8.16575929757038, "SQ_th": 34.90974119484908, "RQ_th": 15.555555555555555,
    "PQ_st": 13.82933037322526, "SQ_st": 53.503327447228, "RQ_st": 25.71428571428571,
    "PQ-circle": 0.0, "PQ-square": 14.205732703206763, "PQ-star": 10.291545189504374,
    "PQ-sky": 15.542704201118385, "PQ-grass": 15.7439446366782, "PQ-wall": 10.201342281879196,
}
EXPECTED_DENSE = {
    "mAP": 10.910067655117158, "AP_det": 23.03194895012018,
    "AP_det@iou0.3": 55.02121640735502, "AP_det@iou0.5": 19.082158970044816,
    "AP_det@iou0.7": 0.0, "AP@iou0.3/meteor0.25": 25.81632476434456,
    "AP@iou0.5/meteor0.25": 10.23147644434773,
    "npos": 36, "num_predictions": 30,
    "caption_match_TP": 10, "caption_match_FP": 18, "caption_match_FN": 26,
}


def word_f1(pairs):
    """A deterministic stand-in for METEOR: the best word-set F1 against the references."""
    scores = []
    for candidate, references in pairs:
        words = set(candidate.split())
        best = 0.0
        for reference in references:
            ref = set(reference.split())
            common = len(words & ref)
            if common:
                best = max(best, 2 * common / (len(words) + len(ref)))
        scores.append(best)
    return scores


def _write_png(path, ids):
    ids = np.asarray(ids, dtype=np.uint32)
    rgb = np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def make_records(root, num_images=8, seed=7):
    """Test-mapper dicts over PNGs written to ``root``: blocky segments, VOID seams, crowd
    regions; the first half with a model's small ids, the rest with COCO's colour ids."""
    rng = np.random.default_rng(seed)
    records = []
    for k in range(num_images):
        num = int(rng.integers(3, 8))
        cell = int(rng.integers(6, 13))
        coarse = rng.integers(0, num, (H // cell + 1, W // cell + 1))
        labels = np.repeat(np.repeat(coarse, cell, 0), cell, 1)[:H, :W]
        if k < num_images // 2:
            label_ids = rng.choice(np.arange(1, 50), size=num, replace=False)
        else:
            label_ids = rng.choice(np.arange(1, 1 << 24), size=num, replace=False)
        ids = label_ids[labels]
        ids[:, int(rng.integers(0, W))] = 0  # a VOID seam
        path = os.path.join(root, f"{k:03d}.png")
        _write_png(path, ids)
        segments = []
        for j, label in enumerate(np.unique(labels)):
            category = int(rng.integers(0, len(CLASSES)))
            name, _, isthing = CLASSES[category]
            colour = COLOURS[int(rng.integers(0, len(COLOURS)))]
            segments.append({
                "id": int(label_ids[label]),
                "category_id": category,
                "isthing": isthing,
                "iscrowd": int(isthing and j == 0 and k % 3 == 0),
                "description": f"a {colour} {name} number {j}",
            })
        records.append({
            "image_id": 100 + k,
            "file_name": os.path.join(root, f"{k:03d}.jpg"),
            "height": H,
            "width": W,
            "pan_seg_file_name": path,
            "segments_info": segments,
        })
    return records


def make_outputs(records, seed=0):
    """Model outputs: the ground truth with ids 1..N, shifted, one segment dropped, one
    relabelled, captions kept, cut or replaced."""
    rng = np.random.default_rng(seed)
    outputs = []
    for record in records:
        gt = read_panoptic_png(record["pan_seg_file_name"])
        pred = np.zeros(gt.shape, np.int32)
        segments = []
        for n, s in enumerate(record["segments_info"], start=1):
            pred[gt == s["id"]] = n
            u = rng.random()
            if u < 0.5:
                caption = s["description"]
            elif u < 0.75:
                caption = " ".join(s["description"].split()[:3] + ["thing"])
            else:
                caption = "something else entirely"
            segments.append({
                "id": n, "category_id": s["category_id"], "isthing": s["isthing"],
                "score": float(np.round(rng.random(), 3)), "caption": caption,
            })
        pred = np.roll(pred, (int(rng.integers(-4, 5)), int(rng.integers(-4, 5))), (0, 1))
        dropped = segments.pop(int(rng.integers(0, len(segments))))
        pred[pred == dropped["id"]] = 0
        if segments:
            segments[-1]["category_id"] = (segments[-1]["category_id"] + 1) % len(CLASSES)
        segments = [s for s in segments if (pred == s["id"]).any()]
        outputs.append({"panoptic_seg": (torch.from_numpy(pred), segments)})
    return outputs


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("gt_cache")
    records = make_records(str(root))
    MetadataCatalog.get(DATASET).set(
        stuff_classes=[c[0] for c in CLASSES],
        thing_classes=[c[0] for c in CLASSES if c[2]],
        stuff_dataset_id_to_contiguous_id={c[1]: i for i, c in enumerate(CLASSES)},
        thing_dataset_id_to_contiguous_id={c[1]: i for i, c in enumerate(CLASSES) if c[2]},
    )
    yield root, records, make_outputs(records)
    MetadataCatalog.pop(DATASET, None)


@pytest.fixture
def count_reads(monkeypatch):
    """Counts the decodes of every reader, per path."""
    reads: dict[str, int] = {}
    original = ground_truth.read_panoptic_ids
    lock = threading.Lock()

    def counting(path):
        with lock:
            reads[os.fspath(path)] = reads.get(os.fspath(path), 0) + 1
        return original(path)

    monkeypatch.setattr(ground_truth, "read_panoptic_ids", counting)
    return reads


def _feed(evaluator, records, outputs, batch_size):
    evaluator.reset()
    for start in range(0, len(records), batch_size):
        evaluator.process(records[start:start + batch_size], outputs[start:start + batch_size])
    with contextlib.redirect_stdout(io.StringIO()):
        return evaluator.evaluate()


def _pix2cap(num_workers, output_dir=None):
    return Pix2CapEvaluator(
        dataset_name=DATASET, output_dir=output_dir, compute_caption_metrics=False,
        num_workers=num_workers, meteor_fn=word_f1,
    )


def _check_expected(results):
    for key, value in EXPECTED_PQ.items():
        assert results["panoptic_seg"][key] == pytest.approx(value, abs=1e-9), key
    for key, value in EXPECTED_DENSE.items():
        assert results["dense_caption"][key] == pytest.approx(value, abs=1e-9), key


# ------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("decoder", ["wuffs", "opencv"])
def test_read_panoptic_ids_equals_read_panoptic_png(tmp_path, monkeypatch, decoder):
    if decoder == "opencv":  # the path taken where pywuffs is not installed
        monkeypatch.setattr(ground_truth, "ImageDecoder", None)
    else:
        pytest.importorskip("pywuffs")
        assert ground_truth.ImageDecoder is not None
    rng = np.random.default_rng(0)
    ids = rng.choice(np.array([0, 1, 255, 256, 65535, 65536, (1 << 24) - 1]), size=(7, 9))
    path = tmp_path / "ids.png"
    _write_png(path, ids)
    fast = read_panoptic_ids(path)
    assert fast.dtype == np.uint32 and fast.shape == (7, 9)
    np.testing.assert_array_equal(fast, read_panoptic_png(path))
    np.testing.assert_array_equal(fast, ids)

    # Transparency makes OpenCV return BGRA: the fallback reads it as read_panoptic_png does.
    rgb = np.stack([ids & 255, (ids >> 8) & 255, ids >> 16], -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "trns.png", transparency=(1, 2, 3))
    np.testing.assert_array_equal(
        read_panoptic_ids(tmp_path / "trns.png"), read_panoptic_png(tmp_path / "trns.png")
    )
    # A palette PNG cannot hold the ids, a missing file is missing: read_panoptic_png's errors.
    Image.fromarray((ids % 7).astype(np.uint8), "L").convert("P").save(tmp_path / "p.png")
    with pytest.raises(DatasetError, match="8-bit RGB"):
        read_panoptic_ids(tmp_path / "p.png")
    with pytest.raises(DatasetError, match="not found"):
        read_panoptic_ids(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DatasetError):
        read_panoptic_ids(tmp_path / "bad.png")

    # A damaged or cut file is an error, never other ids: one bit changed in the middle of
    # the compressed pixels (Wuffs alone decodes such a file to other ids; the chunk's
    # CRC-32 tells), the file cut short.
    data = (tmp_path / "ids.png").read_bytes()
    idat = data.index(b"IDAT")
    damaged = bytearray(data)
    damaged[idat + 4 + int.from_bytes(data[idat - 4 : idat], "big") // 2] ^= 0x01
    (tmp_path / "damaged.png").write_bytes(bytes(damaged))
    (tmp_path / "cut.png").write_bytes(data[: idat + 10])
    for name in ("damaged.png", "cut.png"):
        with pytest.raises(DatasetError, match=name):
            read_panoptic_ids(tmp_path / name)


def test_reader_decodes_once_and_bounds_its_cache(tmp_path, count_reads):
    paths = []
    for k in range(6):
        paths.append(str(tmp_path / f"{k}.png"))
        _write_png(paths[-1], np.full((4, 5), k + 1))
    reader = GroundTruthReader(num_workers=0, cache_size=2)
    first = reader.read(paths[0])
    assert reader.read(paths[0]) is first and not first.flags.writeable
    assert reader.entry(Path(paths[0])) is reader.entry(paths[0])  # path-like keys too
    for path in paths[1:]:
        reader.read(path)
    assert count_reads == {p: 1 for p in paths}
    assert len(reader._entries) == 2  # the LRU: the last two only
    reader.read(paths[0])
    assert count_reads[paths[0]] == 2  # evicted, so read again

    # Pinned entries stay whatever the cache size, and are released after the block.
    with reader.pinned(paths) as entries:
        assert len(reader._entries) == 6
        assert [e.result()[0, 0] for e in entries] == [1, 2, 3, 4, 5, 6]
        for path in paths:
            reader.read(path)
    assert len(reader._entries) == 2
    assert sum(count_reads.values()) == 6 + 1 + 4  # the block read the 4 evicted ones once
    reader.close()
    assert reader.num_decoded == 11 and not reader._entries


def test_concurrent_askers_share_one_decode(tmp_path, monkeypatch):
    path = str(tmp_path / "a.png")
    _write_png(path, np.arange(12).reshape(3, 4))
    calls = []

    def slow_read(p):
        calls.append(p)
        time.sleep(0.05)
        return read_panoptic_ids(p)

    reader = GroundTruthReader(num_workers=2, read_fn=slow_read)
    reader.prefetch([path])  # a worker claims the decode
    results = []
    threads = [threading.Thread(target=lambda: results.append(reader.read(path))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [path] and len(results) == 4
    assert all(r is results[0] for r in results)
    reader.close()

    # A decoding error reaches every asker, from one attempt.
    reader = GroundTruthReader(num_workers=2, read_fn=lambda p: calls.append(p) or 1 / 0)
    entries = reader.prefetch(["x", "x"])
    for entry in entries:
        with pytest.raises(ZeroDivisionError):
            entry.result()
    assert calls.count("x") == 1
    reader.close()


# ------------------------------------------------------------------ one read, same numbers


@pytest.mark.parametrize("num_workers,batch_size", [(0, 1), (2, 1), (2, 3), (2, 8)])
def test_pix2cap_reads_each_png_once_with_the_numbers_of_before(
    data, count_reads, num_workers, batch_size
):
    _, records, outputs = data
    evaluator = _pix2cap(num_workers)
    results = _feed(evaluator, records, outputs, batch_size)
    # Once per image for both evaluators, whatever the batch size (8 > the cache of 4).
    assert count_reads == {r["pan_seg_file_name"]: 1 for r in records}
    assert evaluator.ground_truth.num_decoded == len(records)
    assert list(results) == ["panoptic_seg", "dense_caption"]
    _check_expected(results)
    # Nothing is kept after evaluate().
    assert not evaluator.ground_truth._entries and evaluator.ground_truth._pool is None


def test_standalone_evaluators_give_the_numbers_of_before(data, count_reads):
    _, records, outputs = data
    panoptic = _feed(
        COCOPanopticEvaluator(dataset_name=DATASET, num_workers=2), records, outputs, 2
    )
    dense = _feed(
        DenseCaptionEvaluator(
            dataset_name=DATASET, meteor_fn=word_f1, compute_caption_metrics=False
        ),
        records, outputs, 2,
    )
    _check_expected({**panoptic, **dense})
    # Each evaluator on its own reads each PNG once.
    assert count_reads == {r["pan_seg_file_name"]: 2 for r in records}


def test_threads_give_exactly_the_serial_numbers_and_export(data, tmp_path):
    _, records, outputs = data
    serial = _pix2cap(0, str(tmp_path / "serial"))
    threaded = _pix2cap(3, str(tmp_path / "threaded"))
    a = _feed(serial, records, outputs, 1)
    b = _feed(threaded, records, outputs, 1)
    assert a == b  # exact: the counts are added in image order either way
    pq_a, pq_b = serial._evaluators[0].pq_stat, threaded._evaluators[0].pq_stat
    assert pq_a.pq_per_cat == pq_b.pq_per_cat
    for name in ("panoptic_predictions.json", "dense_caption_results.json"):
        assert json.loads((tmp_path / "serial" / name).read_text()) == json.loads(
            (tmp_path / "threaded" / name).read_text()
        )
    for png in (tmp_path / "serial" / "panoptic_predictions").iterdir():
        assert png.read_bytes() == (tmp_path / "threaded" / "panoptic_predictions" / png.name
                                    ).read_bytes()


def test_queue_is_bounded_and_predictions_are_copied(data):
    _, records, outputs = data
    evaluator = COCOPanopticEvaluator(dataset_name=DATASET, num_workers=2)
    expected = _feed(
        COCOPanopticEvaluator(dataset_name=DATASET, num_workers=0), records, outputs, 1
    )
    evaluator.reset()
    for record, output in zip(records, outputs):
        ids, segments = output["panoptic_seg"]
        reused = {"panoptic_seg": (ids.clone(), [dict(s) for s in segments])}
        evaluator.process([record], [reused])
        assert len(evaluator._pending) <= 4  # 2 * num_workers images wait at most
        # A caller reusing its buffers after process() changes nothing.
        reused["panoptic_seg"][0].zero_()
        reused["panoptic_seg"][1][0]["category_id"] = 0
    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluator.evaluate() == expected


def test_errors_that_need_the_ground_truth_name_the_file_or_image(data, tmp_path):
    _, records, outputs = data
    missing = [dict(records[0], pan_seg_file_name=str(tmp_path / "gone.png"))] + records[1:3]
    evaluator = _pix2cap(2)
    # The dense-caption evaluator needs the PNG within process(): its error comes at once.
    with pytest.raises(DatasetError, match="gone.png"):
        evaluator.process(missing[:1], outputs[:1])
    panoptic = COCOPanopticEvaluator(dataset_name=DATASET, num_workers=2)
    panoptic.process(missing, outputs[:3])
    with pytest.raises(DatasetError, match="gone.png"):
        panoptic.evaluate()
    panoptic.reset()
    small = {"panoptic_seg": (outputs[0]["panoptic_seg"][0][:10], outputs[0]["panoptic_seg"][1])}
    panoptic.process(records[:1], [small])
    with pytest.raises(ValueError, match="image with id 100.*original image size"):
        panoptic.evaluate()


# ---------------------------------------------------------------------------- benchmark


def _load_benchmark():
    path = Path(__file__).resolve().parents[2] / "tools" / "benchmark_pq.py"
    spec = importlib.util.spec_from_file_location("benchmark_pq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_fails_when_the_numbers_differ(tmp_path, capsys, monkeypatch):
    pytest.importorskip("panopticapi")
    benchmark = _load_benchmark()
    import panopticapi.evaluation as panopticapi_eval

    monkeypatch.setattr(panopticapi_eval.multiprocessing, "cpu_count", lambda: 2)
    args = ["--num-images", "4", "--height", "48", "--width", "64", "--repeat", "1"]
    assert benchmark.main(args) == 0
    out = capsys.readouterr().out
    assert "speed-up vs panopticapi: evaluator" in out and "identical" in out

    # A count that differs by one IoU ulp is an error, not a warning.
    original = benchmark.compare

    def tampered(ours, stat, others, theirs, categories):
        key = next(iter(stat.pq_per_cat))
        others["file-to-file"].pq_per_cat[key].iou += 1e-12
        return original(ours, stat, others, theirs, categories)

    monkeypatch.setattr(benchmark, "compare", tampered)
    with pytest.raises(RuntimeError, match="file-to-file counts differ"):
        benchmark.main(args)
