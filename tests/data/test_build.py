import itertools

import pytest

from pix2cap.config import get_cfg
from pix2cap.data import build as build_module
from pix2cap.data.build import (
    MapDataset,
    build_test_loader,
    build_train_loader,
    get_detection_dataset_dicts,
)
from pix2cap.data.catalog import DatasetCatalog
from pix2cap.data.errors import DatasetError
from pix2cap.data.samplers import InferenceSampler, TrainingSampler
from pix2cap.data.transforms import global_rng


def _dicts(n, prefix="img"):
    return [{"file_name": f"/data/{prefix}{i}.jpg", "image_id": i, "index": i} for i in range(n)]


def _identity_mapper(d):
    return {"image_id": d["image_id"], "file_name": d["file_name"]}


def _random_mapper(d):
    """Returns a draw from the augmentation generator, as a random transform would."""
    return {"image_id": d["image_id"], "draw": int(global_rng().integers(1 << 30))}


def _failing_mapper(d):
    if d["image_id"] == 2:
        raise DatasetError(d["file_name"], "corrupt or truncated image file")
    return _identity_mapper(d)


@pytest.fixture
def registered(request):
    names = []

    def register(name, dicts):
        DatasetCatalog.register(name, lambda: dicts)
        names.append(name)

    yield register
    for name in names:
        DatasetCatalog.remove(name)


def test_training_sampler_disjoint_streams_across_ranks():
    size = 10
    streams = [list(itertools.islice(TrainingSampler(size, seed=3, rank=r, world_size=2), 15))
               for r in range(2)]
    # Each pass over the data (5 indices per rank) is a partition of the dataset.
    for p in range(3):
        first = streams[0][5 * p: 5 * p + 5]
        second = streams[1][5 * p: 5 * p + 5]
        assert not set(first) & set(second)
        assert sorted(first + second) == list(range(size))
    assert streams[0][:5] != list(range(0, 10, 2))  # shuffled
    ordered = list(itertools.islice(TrainingSampler(4, shuffle=False, seed=0), 6))
    assert ordered == [0, 1, 2, 3, 0, 1]
    again = list(itertools.islice(TrainingSampler(size, seed=3, rank=0, world_size=2), 15))
    assert again == streams[0]


@pytest.mark.parametrize("size, world_size", [(7, 2), (10, 3), (2, 4), (0, 2)])
def test_inference_sampler_covers_each_index_once(size, world_size):
    samplers = [InferenceSampler(size, rank=r, world_size=world_size) for r in range(world_size)]
    shards = [list(s) for s in samplers]
    assert list(itertools.chain(*shards)) == list(range(size))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert [len(s) for s in samplers] == [len(s) for s in shards]


def test_get_detection_dataset_dicts(registered):
    registered("tb_a", _dicts(3, "a"))
    registered("tb_b", _dicts(2, "b"))
    registered("tb_empty", [])
    both = get_detection_dataset_dicts(["tb_a", "tb_b"])
    assert [d["file_name"] for d in both] == [f"/data/a{i}.jpg" for i in range(3)] + \
        [f"/data/b{i}.jpg" for i in range(2)]
    with pytest.raises(ValueError, match="tb_empty.*empty"):
        get_detection_dataset_dicts(["tb_a", "tb_empty"])
    with pytest.raises(ValueError, match="no dataset names"):
        get_detection_dataset_dicts([])

    annotated = [
        {"file_name": "x0", "segments_info": [{"id": 1, "iscrowd": 0}]},
        {"file_name": "x1", "segments_info": []},
        {"file_name": "x2", "segments_info": [{"id": 1, "iscrowd": 1}]},
        {"file_name": "x3"},  # caption-only dataset: kept
    ]
    registered("tb_annotated", annotated)
    kept = get_detection_dataset_dicts("tb_annotated")
    assert [d["file_name"] for d in kept] == ["x0", "x3"]
    assert len(get_detection_dataset_dicts("tb_annotated", filter_empty=False)) == 4


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_loader_batches(num_workers):
    loader = build_train_loader(dataset=_dicts(5), mapper=_identity_mapper, total_batch_size=2,
                                num_workers=num_workers, seed=1)
    batches = list(itertools.islice(iter(loader), 6))  # more than one pass: infinite
    assert all(isinstance(b, list) and len(b) == 2 for b in batches)
    items = [x for b in batches for x in b]
    assert all(isinstance(x, dict) and set(x) == {"image_id", "file_name"} for x in items)
    ids = [x["image_id"] for b in batches for x in b]
    assert sorted(ids[:5]) == list(range(5))


def test_train_loader_augmentations_reproducible_and_differ_per_worker():
    def draws(seed, workers):
        loader = build_train_loader(dataset=_dicts(8), mapper=_random_mapper, total_batch_size=1,
                                    num_workers=workers, seed=seed)
        return [b[0]["draw"] for b in itertools.islice(iter(loader), 6)]

    assert draws(5, 0) == draws(5, 0)
    assert draws(5, 0) != draws(6, 0)
    two_workers = draws(5, 2)
    assert two_workers == draws(5, 2)
    # Batches alternate between the two workers; their random streams must differ.
    assert two_workers[0::2] != two_workers[1::2]


def test_train_loader_batch_must_divide_by_world_size(monkeypatch):
    monkeypatch.setattr(build_module.comm, "get_world_size", lambda: 2)
    with pytest.raises(ValueError, match="total batch size 3 .* multiple .* processes \\(2\\)"):
        build_train_loader(dataset=_dicts(4), mapper=_identity_mapper, total_batch_size=3,
                           sampler=TrainingSampler(4, seed=0, rank=0, world_size=2))
    loader = build_train_loader(dataset=_dicts(4), mapper=_identity_mapper, total_batch_size=4,
                                sampler=TrainingSampler(4, seed=0, rank=0, world_size=2))
    assert len(next(iter(loader))) == 2


def test_train_loader_from_config(registered):
    registered("tb_cfg_train", _dicts(6))
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = ("tb_cfg_train",)
    cfg.SOLVER.IMS_PER_BATCH = 3
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = 0
    loader = build_train_loader(cfg, mapper=_identity_mapper)
    batch = next(iter(loader))
    assert len(batch) == 3 and all(x["file_name"].startswith("/data/img") for x in batch)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_test_loader(registered, num_workers):
    loader = build_test_loader(dataset=_dicts(5), mapper=_identity_mapper, num_workers=num_workers)
    batches = list(loader)
    assert all(len(b) == 1 for b in batches)
    assert [b[0]["image_id"] for b in batches] == list(range(5))

    registered(f"tb_cfg_test{num_workers}", _dicts(3))
    cfg = get_cfg()
    cfg.DATALOADER.NUM_WORKERS = num_workers
    loader = build_test_loader(cfg, f"tb_cfg_test{num_workers}", mapper=_identity_mapper)
    assert [b[0]["image_id"] for b in loader] == [0, 1, 2]


def test_loader_errors_name_the_file():
    loader = build_test_loader(dataset=_dicts(4), mapper=_failing_mapper, num_workers=0)
    with pytest.raises(DatasetError, match=r"/data/img2\.jpg: corrupt or truncated"):
        list(loader)
    loader = build_test_loader(dataset=_dicts(4), mapper=_failing_mapper, num_workers=1)
    # Worker errors come back re-raised by torch, with the original message inside.
    with pytest.raises(Exception, match=r"/data/img2\.jpg: corrupt or truncated"):
        list(loader)


def test_map_dataset_retries_only_when_asked(caplog):
    strict = MapDataset(_dicts(4), _failing_mapper)
    assert strict[1]["image_id"] == 1
    with pytest.raises(DatasetError, match="img2"):
        strict[2]
    lenient = MapDataset(_dicts(4), _failing_mapper, max_retries=3)
    replaced = lenient[2]
    assert replaced["image_id"] != 2
    assert replaced == MapDataset(_dicts(4), _failing_mapper, max_retries=3)[2]
    assert any("img2.jpg" in r.getMessage() for r in caplog.records)


def test_train_loader_with_panoptic_mapper_in_a_worker(tmp_path):
    from pix2cap.data.mappers import PanopticLSJDatasetMapper, build_lsj_augmentations
    from tests.data.test_mapper import _make_dict

    d = _make_dict(tmp_path)
    mapper = PanopticLSJDatasetMapper(
        is_train=True, augmentations=build_lsj_augmentations(16, 0.5, 1.5, "horizontal")
    )
    loader = build_train_loader(dataset=[d, d, d], mapper=mapper, total_batch_size=2,
                                num_workers=1, seed=0)
    batch = next(iter(loader))
    assert len(batch) == 2
    for item in batch:
        assert item["image"].shape == (3, 16, 16)
        assert item["instances"].gt_masks.shape[1:] == (16, 16)
        assert len(item["instances"].gt_captions) == len(item["instances"])
