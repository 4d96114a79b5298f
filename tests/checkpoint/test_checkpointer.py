import logging
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import pix2cap.checkpoint.checkpointer as checkpointer_module
from pix2cap.checkpoint import Checkpointer, CheckpointError, CheckpointNotFoundError
from pix2cap.utils.errors import Pix2CapError


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _trained(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return optimizer


def test_save_and_resume_roundtrip_loads_with_weights_only(tmp_path):
    model = _model(0)
    optimizer = _trained(model)
    Checkpointer(model, str(tmp_path), optimizer=optimizer).save("model_0000004", iteration=4)
    path = tmp_path / "model_0000004.pth"
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000004.pth"
    raw = torch.load(path, weights_only=True)  # only tensors and plain containers
    assert raw["iteration"] == 4 and isinstance(raw["iteration"], int)

    other = _model(1)
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=0.1)
    extra = Checkpointer(other, str(tmp_path), optimizer=other_optimizer).resume_or_load(
        "", resume=True
    )
    assert extra == {"iteration": 4}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert other_optimizer.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert torch.equal(
        other_optimizer.state_dict()["state"][0]["exp_avg"],
        optimizer.state_dict()["state"][0]["exp_avg"],
    )


def test_crash_during_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = _model(0)
    checkpointer = Checkpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def crashing_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointer_module.torch, "save", crashing_save)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000001")  # overwrite attempt
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save("model_0000002")  # new file attempt
    monkeypatch.undo()

    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]  # no temp files
    assert checkpointer.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")
    fresh = _model(3)
    Checkpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert torch.equal(fresh[0].weight, _model(0)[0].weight)


class _NotATensor:
    pass


class _Hostile:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


_REFUSED = (
    "refused: it holds pickled Python objects, not only tensors and plain containers (loading "
    "it would import and call {}); pix2cap loads checkpoints without unpickling objects. "
    "Provide the weights as a state dict of tensors (torch.save(model.state_dict(), ...)) or "
    "as a .safetensors file"
)


def test_pickled_objects_are_refused_with_the_file_name(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError) as info:
        Checkpointer(_model()).load(str(path))
    assert str(info.value) == f"{path}: " + _REFUSED.format(
        "tests.checkpoint.test_checkpointer._NotATensor"
    )
    assert "weights_only" not in str(info.value)  # never advise turning the safety off

    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.pth"
    torch.save({"model": _model().state_dict(), "x": _Hostile(marker)}, hostile)
    with pytest.raises(CheckpointError) as info:
        Checkpointer(_model()).load(str(hostile))
    assert str(info.value) == f"{hostile}: " + _REFUSED.format("io.open")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_missing_and_corrupt_files_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointNotFoundError) as info:
        Checkpointer(_model()).load(str(tmp_path / "nowhere.pth"))
    assert str(info.value) == f"{tmp_path / 'nowhere.pth'}: checkpoint file not found"
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, Pix2CapError)
    with pytest.raises(CheckpointNotFoundError) as info:
        Checkpointer(_model()).load(str(tmp_path))
    assert str(info.value) == (
        f"{tmp_path}: is a folder; MODEL.WEIGHTS must name a local checkpoint file (.pth, .pt "
        "or .safetensors)"
    )

    Checkpointer(_model(), str(tmp_path)).save("full")
    full = (tmp_path / "full.pth").read_bytes()
    cases = {
        "truncated.pth": (
            full[:100],
            "corrupt or truncated checkpoint (PytorchStreamReader failed reading zip archive: "
            "failed finding central directory)",
        ),
        "cut_end.pth": (
            full[:-30],
            "corrupt or truncated checkpoint (PytorchStreamReader failed reading zip archive: "
            "failed finding central directory)",
        ),
        "empty.pth": (b"", "empty or truncated checkpoint file"),
        "random.pth": (
            np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
            "corrupt, or not a PyTorch checkpoint",
        ),
        "plain_pickle.pth": (pickle.dumps({"a": 1}), "corrupt, or not a PyTorch checkpoint"),
        "text.pth": (b"hello world\n", "corrupt, or not a PyTorch checkpoint (KeyError: 101)"),
    }
    for name, (data, problem) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            Checkpointer(_model()).load(str(tmp_path / name))
        assert str(info.value) == f"{tmp_path / name}: {problem}", name
        assert "weights_only" not in str(info.value)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError) as info:
        Checkpointer(_model()).load(str(junk))
    assert str(info.value).startswith(
        f"{junk}: not a readable safetensors file, corrupt or truncated ("
    )


def test_files_that_are_not_checkpoints_are_named_as_such(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    torch.save({"step": 3, "note": "x"}, tmp_path / "no_model.pth")
    torch.save({"model": {"w": 1}}, tmp_path / "model_not_tensors.pth")
    expected = {
        "list.pth": "not a checkpoint: it holds a list, not a dict with a 'model' state dict",
        "no_model.pth": (
            "not a checkpoint: no 'model' entry and not a state dict of tensors; keys: "
            "['note', 'step']"
        ),
        "model_not_tensors.pth": (
            "not a checkpoint: its 'model' entry is not a state dict of tensors"
        ),
    }
    for name, problem in expected.items():
        with pytest.raises(CheckpointError) as info:
            Checkpointer(_model()).load(str(tmp_path / name))
        assert str(info.value) == f"{tmp_path / name}: {problem}"


@pytest.mark.parametrize(
    "path, kind",
    [
        ("https://example.com/model_final.pth", "is a URL"),
        ("http://example.com/model_final.pth", "is a URL"),
        ("s3://bucket/model_final.pth", "is a URL"),
        ("gs://bucket/model_final.pth", "is a URL"),
        ("hf://org/pix2cap", "is a URL"),
        ("hf-hub:org/pix2cap", "names a model hub"),
        ("hub:pix2cap", "names a model hub"),
        ("org/pix2cap", "is no path on disk and looks like a model hub name (org/name)"),
    ],
)
def test_urls_and_hub_names_are_refused_without_a_network_call(tmp_path, monkeypatch, path, kind):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("the network was contacted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.chdir(tmp_path)
    checkpointer = Checkpointer(_model())
    # fvcore's HTTP handler (which downloads) is not installed.
    assert not checkpointer.path_manager._path_handlers
    with pytest.raises(CheckpointNotFoundError) as info:
        checkpointer.load(path)
    assert str(info.value) == (
        f"{path}: MODEL.WEIGHTS = {path!r} {kind}, and pix2cap never downloads anything at run "
        "time; fetch it yourself and set MODEL.WEIGHTS to a local checkpoint file (.pth, .pt or "
        ".safetensors)"
    )


def test_relative_paths_are_local_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "output").mkdir()
    source = _model(0)
    Checkpointer(source, "output").save("model_final")
    target = _model(1)
    Checkpointer(target).load("output/model_final.pth")  # "org/name"-shaped, but a file
    assert torch.equal(target[0].weight, source[0].weight)
    with pytest.raises(CheckpointNotFoundError) as info:
        Checkpointer(target).load("output/model_0000999.pth")
    assert str(info.value) == "output/model_0000999.pth: checkpoint file not found"


def test_checkpoint_of_another_model_is_refused_unless_partial(tmp_path, caplog):
    source = _model(0)
    path = tmp_path / "other.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, path)
    target = _model(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        Checkpointer(target).load(str(path))
    assert str(info.value) == (
        f"{path}: matches only 0 of the model's 6 parameter tensors, 0 of 34 parameter values "
        "(0.0%), less than the 50% required: it is probably not a checkpoint of this model (its "
        "keys: backbone.0.weight, backbone.0.bias, backbone.1.weight; the model's: 0.weight, "
        "0.bias, 1.weight). To initialise only part of the model from it, set "
        "MODEL.WEIGHTS_PARTIAL True (Checkpointer(..., partial=True))"
    )
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k  # nothing was loaded

    # The many small tensors without the large weight matrices: 4 of 6 tensors, but only 14 of
    # the 34 values.
    small = {k: v for k, v in source.state_dict().items() if k not in ("0.weight", "2.weight")}
    torch.save(small, tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match=r"matches only 4 of the model's 6 parameter "
                       r"tensors, 14 of 34 parameter values \(41\.2%\)"):
        Checkpointer(target).load(str(tmp_path / "small.pth"))

    with caplog.at_level(logging.WARNING, logger="fvcore.common.checkpoint"):
        Checkpointer(target, partial=True).load(str(tmp_path / "small.pth"))
    assert torch.equal(target[2].bias, source[2].bias)
    assert not torch.equal(target[2].weight, source[2].weight)
    assert (
        f"Checkpoint {tmp_path / 'small.pth'} covers only 4 of the model's 6 parameter tensors, "
        "14 of 34 parameter values (41.2%); loading it as a partial initialisation" in caplog.text
    )
    fresh = _model(2)
    Checkpointer(fresh).load(str(tmp_path / "small.pth"), partial=True)  # per call
    assert torch.equal(fresh[0].bias, source[0].bias)

    # Half or more loads as before: the weight matrices are 20 of the 34 values.
    big = {k: v for k, v in source.state_dict().items() if k in ("0.weight", "2.weight")}
    torch.save(big, tmp_path / "big.pth")
    Checkpointer(fresh).load(str(tmp_path / "big.pth"))
    assert torch.equal(fresh[0].weight, source[0].weight)


def test_errors_pickle_with_their_path_and_problem(tmp_path):
    error = CheckpointNotFoundError("/x/model.pth", "checkpoint file not found")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is CheckpointNotFoundError
    assert (again.path, again.problem, str(again)) == (
        "/x/model.pth",
        "checkpoint file not found",
        "/x/model.pth: checkpoint file not found",
    )


def test_safetensors_and_bare_state_dicts_load_as_model_weights(tmp_path):
    from safetensors.torch import save_file

    source = _model(0)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "weights.safetensors"))
    target = _model(1)
    Checkpointer(target).load(str(tmp_path / "weights.safetensors"))
    for a, b in zip(source.state_dict().values(), target.state_dict().values()):
        assert torch.equal(a, b)

    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "bare.pth")
    target = _model(2)
    Checkpointer(target).load(str(tmp_path / "bare.pth"))  # DDP prefix stripped
    assert torch.equal(target[2].weight, source[2].weight)


def test_non_main_process_does_not_write(tmp_path):
    Checkpointer(_model(), str(tmp_path), save_to_disk=False).save("model_final")
    assert os.listdir(tmp_path) == []


def test_export_model_weights_round_trips(tmp_path):
    from pix2cap.checkpoint import Checkpointer, export_model_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[1].weight = torch.nn.Parameter(torch.randn(2, 4))
    Checkpointer(model, save_dir=str(tmp_path)).save("model_final", iteration=7)
    out = tmp_path / "release" / "model.safetensors"
    info = export_model_weights(str(tmp_path / "model_final.pth"), str(out))
    assert info["tensors"] == 4 and info["bytes"] == out.stat().st_size

    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    Checkpointer(fresh).load(str(out))
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="must end with .safetensors"):
        export_model_weights(str(tmp_path / "model_final.pth"), str(tmp_path / "x.pth"))
