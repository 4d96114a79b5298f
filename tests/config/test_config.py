import logging

import pytest
import torch
from torch import nn

from pix2cap.config import CfgNode, ConfigError, configurable, get_cfg


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_defaults_are_complete_and_independent_copies():
    cfg = get_cfg()
    assert cfg.SOLVER.BASE_LR == pytest.approx(1e-4)
    assert cfg.INPUT.MIN_SCALE == pytest.approx(0.1) and cfg.INPUT.MAX_SCALE == pytest.approx(2.0)
    cfg.SOLVER.BASE_LR = 3.0
    assert get_cfg().SOLVER.BASE_LR == pytest.approx(1e-4)


def test_every_default_key_has_a_comment():
    import inspect
    import re

    from pix2cap.config import defaults

    for lineno, line in enumerate(inspect.getsource(defaults).splitlines(), 1):
        m = re.match(r"_C(\.[A-Z0-9_]+)+ = (?!CN\(\))", line)
        if m:
            assert "#" in line, f"defaults.py:{lineno} has no comment: {line}"


def test_base_inheritance_chains_and_overrides(tmp_path):
    base = _write(
        tmp_path / "Base.yaml",
        "SOLVER:\n  BASE_LR: 0.5\n  MAX_ITER: 100\nINPUT:\n  IMAGE_SIZE: 512\n",
    )
    mid_dir = tmp_path / "sub"
    mid_dir.mkdir()
    mid = _write(mid_dir / "mid.yaml", "_BASE_: ../Base.yaml\nSOLVER:\n  MAX_ITER: 200\n")
    child = _write(mid_dir / "child.yaml", "_BASE_: mid.yaml\nINPUT:\n  IMAGE_SIZE: 256\n")
    cfg = get_cfg()
    cfg.merge_from_file(child)
    assert cfg.SOLVER.BASE_LR == pytest.approx(0.5)  # from Base, two levels up
    assert cfg.SOLVER.MAX_ITER == 200  # mid overrides Base
    assert cfg.INPUT.IMAGE_SIZE == 256  # child overrides Base
    assert mid and base

    cfg.merge_from_list(["SOLVER.MAX_ITER", "7", "DATASETS.TRAIN", "('shapes_train',)"])
    assert cfg.SOLVER.MAX_ITER == 7
    assert cfg.DATASETS.TRAIN == ("shapes_train",)


def test_unknown_key_names_the_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "SOLVER:\n  NOT_A_KEY: 1\n")
    with pytest.raises(ConfigError, match="bad.yaml.*NOT_A_KEY"):
        get_cfg().merge_from_file(bad)


def test_python_configs_are_never_executed(tmp_path):
    marker = tmp_path / "executed"
    py = _write(tmp_path / "cfg.py", f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(ConfigError, match="only YAML"):
        get_cfg().merge_from_file(py)
    assert not marker.exists()


def test_yaml_is_loaded_safely(tmp_path):
    unsafe = _write(tmp_path / "unsafe.yaml", "SEED: !!python/object/apply:os.getpid []\n")
    with pytest.raises(ConfigError, match="unsafe.yaml"):
        get_cfg().merge_from_file(unsafe)


def test_missing_file_and_odd_overrides_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        get_cfg().merge_from_file(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="KEY VALUE pairs"):
        get_cfg().merge_from_list(["SOLVER.MAX_ITER"])
    with pytest.raises(ConfigError, match="bad override"):
        get_cfg().merge_from_list(["SOLVER.NO_SUCH", "1"])


class _Head(nn.Module):
    @configurable
    def __init__(self, *, dim: int, num_layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_layers))

    @classmethod
    def from_config(cls, cfg):
        return {"dim": cfg.MODEL.PIXEL_BASELINE.HIDDEN_DIM, "num_layers": cfg.MODEL.PIXEL_BASELINE.NUM_LAYERS}


def test_configurable_class_without_and_with_config():
    head = _Head(dim=4)
    assert len(head.layers) == 2 and head.layers[0].in_features == 4

    cfg = get_cfg()
    cfg.MODEL.PIXEL_BASELINE.HIDDEN_DIM = 6
    cfg.MODEL.PIXEL_BASELINE.NUM_LAYERS = 3
    head = _Head(cfg)
    assert len(head.layers) == 3 and head.layers[0].in_features == 6
    head = _Head(cfg, num_layers=1)  # explicit keywords override the config
    assert len(head.layers) == 1
    with pytest.raises(TypeError):
        _Head(4)  # keyword-only


def _scale_from_config(cfg, factor=1.0):
    return {"value": cfg.SOLVER.BASE_LR, "factor": factor}


@configurable(from_config=_scale_from_config)
def _scale(*, value, factor=1.0):
    return value * factor


def test_configurable_function():
    assert _scale(value=2.0, factor=3.0) == pytest.approx(6.0)
    cfg = get_cfg()
    cfg.SOLVER.BASE_LR = 0.5
    assert _scale(cfg) == pytest.approx(0.5)
    assert _scale(cfg, factor=4.0) == pytest.approx(2.0)


def test_cfgnode_is_fvcore_compatible():
    from fvcore.common.config import CfgNode as FvcoreCfgNode

    cfg = get_cfg()
    assert isinstance(cfg, CfgNode) and isinstance(cfg, FvcoreCfgNode)
    text = cfg.dump()
    reloaded = CfgNode.load_cfg(text)
    assert reloaded.SOLVER.MAX_ITER == cfg.SOLVER.MAX_ITER
    assert torch.is_tensor(torch.tensor(cfg.MODEL.PIXEL_MEAN))


def _shipped_configs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml"))


@pytest.mark.parametrize("name", _shipped_configs())
def test_every_shipped_config_loads(name):
    from pathlib import Path

    cfg = get_cfg()
    cfg.merge_from_file(str(Path(__file__).resolve().parents[2] / "configs" / name))
    assert cfg.MODEL.META_ARCHITECTURE == "Pix2Cap"
    if name.startswith("shapes/"):
        assert cfg.DATASETS.TRAIN == ("shapes_train",) and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 9
        assert cfg.MODEL.DEVICE == "cpu"


class _Records(logging.Handler):
    """Keeps the records it is given (whatever ``propagate`` says, unlike caplog)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


REMOVED_CAPTION_HEAD_KEYS = {
    "VOCAB_SIZE": "VOCAB_FILE",
    "BOS_TOKEN_ID": "[CLS]",
    "EOS_TOKEN_ID": "[SEP]",
    "PAD_TOKEN_ID": "[PAD]",
    "QUERY_DIM": "MODEL.MASK_FORMER.HIDDEN_DIM",
    "GLOBAL_DIM": "MODEL.SEM_SEG_HEAD.CONVS_DIM",
}


def test_removed_keys_load_with_a_warning(tmp_path):
    text = "MODEL:\n  CAPTION_HEAD:\n" + "".join(f"    {k}: 7\n" for k in REMOVED_CAPTION_HEAD_KEYS)
    old = _write(tmp_path / "old.yaml", text + "    MAX_LENGTH: 21\n")
    handler = _Records()
    records = handler.records
    logging.getLogger("pix2cap.config.config").addHandler(handler)
    try:
        cfg = get_cfg()
        cfg.merge_from_file(old)
        assert cfg.MODEL.CAPTION_HEAD.MAX_LENGTH == 21  # the rest of the file still applies
        for key in REMOVED_CAPTION_HEAD_KEYS:
            assert key not in cfg.MODEL.CAPTION_HEAD
        messages = [r.getMessage() for r in records]
        for key, source in REMOVED_CAPTION_HEAD_KEYS.items():
            hits = [m for m in messages if f"MODEL.CAPTION_HEAD.{key} " in m]
            assert len(hits) == 1 and "removed" in hits[0] and source in hits[0], messages
        assert all(r.levelno == logging.WARNING for r in records)

        # Command-line overrides of a removed key are ignored the same way.
        del records[:]
        cfg.merge_from_list(["MODEL.CAPTION_HEAD.VOCAB_SIZE", "274"])
        assert "MODEL.CAPTION_HEAD.VOCAB_SIZE" in records[0].getMessage()
    finally:
        logging.getLogger("pix2cap.config.config").removeHandler(handler)
    # Unknown keys still fail, and the removed ones are not in a dumped config.
    with pytest.raises(ConfigError, match="NOT_A_KEY"):
        get_cfg().merge_from_list(["MODEL.CAPTION_HEAD.NOT_A_KEY", "1"])
    assert "VOCAB_SIZE" not in get_cfg().dump()


@pytest.mark.parametrize(
    "name, memory", [("pix2cap_effl0", "scene"), ("pix2cap_effl0_paper", "query_global")]
)
def test_full_config_of_the_shipped_models_still_loads(name, memory):
    from pathlib import Path

    zoo = Path(__file__).resolve().parents[2] / "model_zoo"
    path = zoo / "shapes" / f"{name}_full_config.yaml"
    cfg = get_cfg()
    cfg.merge_from_file(str(path))
    assert cfg.MODEL.CAPTION_HEAD.VOCAB_FILE == "configs/shapes/shapes_vocab.txt"
    assert cfg.MODEL.CAPTION_HEAD.MEMORY == memory
