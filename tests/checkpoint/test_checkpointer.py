import os

import pytest
import torch
from torch import nn

import pix2cap.checkpoint.checkpointer as checkpointer_module
from pix2cap.checkpoint import Checkpointer, CheckpointError


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


def test_pickled_objects_are_refused_with_the_file_name(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "payload": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="evil.pth.*weights_only"):
        Checkpointer(_model()).load(str(path))


def test_missing_and_corrupt_files_raise_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth: checkpoint file not found"):
        Checkpointer(_model()).load(str(tmp_path / "nowhere.pth"))
    truncated = tmp_path / "truncated.pth"
    Checkpointer(_model(), str(tmp_path)).save("full")
    truncated.write_bytes((tmp_path / "full.pth").read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated.pth: corrupt or truncated"):
        Checkpointer(_model()).load(str(truncated))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors at all")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        Checkpointer(_model()).load(str(junk))


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
