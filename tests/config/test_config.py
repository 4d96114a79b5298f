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
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(bad)
    assert str(info.value) == f"{bad}: unknown config key SOLVER.NOT_A_KEY"
    assert info.value.path == bad
    typo = _write(tmp_path / "typo.yaml", "SOLVER:\n  BASE_RL: 0.1\nMODEL:\n  MAX_ITER: 3\n")
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(typo)
    assert str(info.value) == (
        f"{typo}: unknown config key SOLVER.BASE_RL (did you mean SOLVER.BASE_LR?)"
    )
    misplaced = _write(tmp_path / "misplaced.yaml", "MODEL:\n  MAX_ITER: 3\n")
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(misplaced)
    assert str(info.value) == (
        f"{misplaced}: unknown config key MODEL.MAX_ITER (did you mean SOLVER.MAX_ITER?)"
    )


@pytest.mark.parametrize(
    "text, problem",
    [
        (
            'SOLVER: {BASE_LR: "abc"}\n',
            "SOLVER.BASE_LR must be a float like its default 0.0001, got a string 'abc'",
        ),
        (
            "SOLVER:\n  BASE_LR: [0.1, 0.2]\n",
            "SOLVER.BASE_LR must be a float like its default 0.0001, got a list [0.1, 0.2]",
        ),
        (
            "SOLVER:\n  BASE_LR: 1\n",
            "SOLVER.BASE_LR must be a float like its default 0.0001, got an integer 1 "
            "(write it as a float: 1.0)",
        ),
        (
            "SOLVER:\n  MAX_ITER: {A: 1}\n",
            "SOLVER.MAX_ITER must be an integer like its default 90000, got a group of keys (A)",
        ),
        (
            "SOLVER: 3\n",
            "SOLVER is a group of keys (OPTIMIZER, BASE_LR, MOMENTUM, BETAS, ...), got an "
            "integer 3",
        ),
        (
            "MODEL:\n  BACKBONE:\n    FREEZE: maybe\n",
            "MODEL.BACKBONE.FREEZE must be a boolean like its default True, got a string 'maybe'",
        ),
        ("- SOLVER\n", "a config file must hold a mapping of keys (e.g. 'SOLVER: {BASE_LR: "
         "0.01}'), got a list"),
        ("SOLVER:\n  BASE_LR: 0.1\n   MAX_ITER: 3\n",
         "invalid YAML at line 3, column 12: mapping values are not allowed here"),
        ("SOLVER: {BASE_LR: 0.1\n", "invalid YAML at line 2, column 1: expected ',' or '}', but "
         "got '<stream end>'"),
    ],
)
def test_wrong_types_and_syntax_errors_name_the_file_and_key(tmp_path, text, problem):
    path = _write(tmp_path / "wrong.yaml", text)
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(path)
    assert str(info.value) == f"{path}: {problem}"
    assert (info.value.path, info.value.problem) == (path, problem)
    assert "\n" not in str(info.value)  # one line for an "error: ..." print


def test_problems_in_a_base_name_the_base_file(tmp_path):
    base = _write(tmp_path / "base.yaml", "SOLVER:\n  BASE_LR: abc\n")
    child = _write(tmp_path / "child.yaml", "_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 5\n")
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(child)
    assert str(info.value).startswith(f"{base}: SOLVER.BASE_LR must be a float")

    missing = _write(tmp_path / "missing_base.yaml", "_BASE_: nowhere.yaml\n")
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(missing)
    nowhere = tmp_path / "nowhere.yaml"
    assert str(info.value) == f"{missing}: its _BASE_ file {nowhere} does not exist"
    loop = _write(tmp_path / "loop.yaml", "_BASE_: loop2.yaml\n")
    _write(tmp_path / "loop2.yaml", "_BASE_: loop.yaml\n")
    with pytest.raises(ConfigError, match="its _BASE_ chain includes the file itself"):
        get_cfg().merge_from_file(loop)
    remote = _write(tmp_path / "remote.yaml", "_BASE_: https://example.com/base.yaml\n")
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(remote)
    assert str(info.value).startswith(
        f"{remote}: _BASE_ = 'https://example.com/base.yaml' is a URL, and pix2cap never "
        "downloads anything at run time"
    )
    empty = _write(tmp_path / "empty.yaml", "")
    cfg = get_cfg()
    cfg.merge_from_file(empty)  # an empty file sets nothing
    assert cfg == get_cfg()


@pytest.mark.parametrize(
    "key, value, kind",
    [
        ("MODEL.WEIGHTS", "https://example.com/model_final.pth", "is a URL"),
        ("MODEL.WEIGHTS", "s3://bucket/model_final.pth", "is a URL"),
        ("MODEL.WEIGHTS", "gs://bucket/model_final.pth", "is a URL"),
        ("MODEL.WEIGHTS", "hf://org/model", "is a URL"),
        ("MODEL.BACKBONE.WEIGHTS", "hf-hub:timm/tf_efficientnet_lite0.in1k", "names a model hub"),
        ("MODEL.BACKBONE.WEIGHTS", "hub:resnet18", "names a model hub"),
        (
            "MODEL.BACKBONE.WEIGHTS",
            "timm/resnet18.a1_in1k",
            "is no path on disk and looks like a model hub name (org/name)",
        ),
        (
            "TEST.PANCAP.LM_PATH",
            "Qwen/Qwen2.5-0.5B",
            "is no path on disk and looks like a model hub name (org/name)",
        ),
        ("MODEL.CAPTION_HEAD.VOCAB_FILE", "http://example.com/vocab.txt", "is a URL"),
        ("TEST.PANCAP.EMBEDDER", "hf://sentence-transformers/all-MiniLM-L6-v2", "is a URL"),
        ("TEST.PANCAP.JUDGE_MODEL", "https://example.com/judge", "is a URL"),
    ],
)
def test_remote_weights_are_refused_without_a_download(tmp_path, monkeypatch, key, value, kind):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the network was contacted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.chdir(tmp_path)
    group, _, leaf = key.rpartition(".")
    text = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(group.split(".")))
    indent = "  " * (group.count(".") + 1)
    path = _write(tmp_path / "remote.yaml", text + f"{indent}{leaf}: {value}\n")
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(path)
    from pix2cap.config.config import LOCAL_FILE_KEYS

    assert str(info.value) == (
        f"{path}: {key} = {value!r} {kind}, and pix2cap never downloads anything at run time; "
        f"fetch it yourself and set {key} to {LOCAL_FILE_KEYS[key]}"
    )
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_list([key, value])
    assert str(info.value).startswith(f"config overrides: {key} = {value!r} {kind}")


def test_local_paths_and_names_are_not_mistaken_for_hubs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "small_lm").mkdir()
    cfg = get_cfg()
    cfg.merge_from_list(
        [
            "MODEL.WEIGHTS", "output/model_final.pth",  # missing, but a file name: not a hub
            "MODEL.BACKBONE.WEIGHTS", "package:efficientnet_lite0",
            "TEST.PANCAP.LM_PATH", "models/small_lm",  # an existing relative folder
            "TEST.PANCAP.EMBEDDER", "none",
            "TEST.PANCAP.JUDGE_MODEL", "Qwen/Qwen2.5-7B-Instruct",  # a served model's name
            "MODEL.CAPTION_HEAD.VOCAB_FILE", "configs/shapes/shapes_vocab.txt",
        ]
    )
    assert cfg.MODEL.WEIGHTS == "output/model_final.pth"
    assert cfg.TEST.PANCAP.LM_PATH == "models/small_lm"
    assert cfg.TEST.PANCAP.JUDGE_MODEL == "Qwen/Qwen2.5-7B-Instruct"
    assert get_cfg().MODEL.WEIGHTS_PARTIAL is False


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
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_list(["SOLVER.NO_SUCH", "1"])
    assert str(info.value) == "config overrides: unknown config key SOLVER.NO_SUCH"
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_list(["SOLVER.BASE_LR", "abc"])
    assert str(info.value) == (
        "config overrides: SOLVER.BASE_LR must be a float like its default 0.0001, got a "
        "string 'abc'"
    )


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
