import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from captioner.models.checkpoint import (
    CheckpointError,
    load_model,
    load_tensors,
    new_model,
    save_model,
    save_tensors,
)
from captioner.models.no_init import NoInit


def test_round_trip_is_exact(tmp_path, tiny_model):
    tiny_model.info = {"data": "synthetic", "metrics": {"CIDEr": 1.5}}
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path)
    loaded = load_model(path)
    assert loaded.vocab == tiny_model.vocab
    assert loaded.model_cfg == tiny_model.model_cfg and loaded.decode_cfg == tiny_model.decode_cfg
    assert loaded.info == tiny_model.info
    original = tiny_model.decoder.state_dict()
    for name, tensor in loaded.decoder.state_dict().items():
        assert torch.equal(tensor, original[name]), name


@pytest.mark.parametrize("key, value", [("deep_output", True), ("encoder_head", 14)])
def test_model_options_round_trip_and_older_files_without_them_still_load(tmp_path, tiny_model, key, value):
    variant = new_model(dataclasses.replace(tiny_model.model_cfg, **{key: value}), tiny_model.vocab,
                        tiny_model.encoder_dim, tiny_model.decode_cfg)
    save_model(variant, tmp_path / "variant.safetensors")
    loaded = load_model(tmp_path / "variant.safetensors")
    assert getattr(loaded.model_cfg, key) == value
    original = variant.decoder.state_dict()
    assert loaded.decoder.state_dict().keys() == original.keys()
    for name, tensor in loaded.decoder.state_dict().items():
        assert torch.equal(tensor, original[name]), name

    # A file written before the option existed: its model config has no such key.
    save_model(tiny_model, tmp_path / "plain.safetensors")
    tensors, meta = load_tensors(tmp_path / "plain.safetensors")
    del meta["model"][key]
    save_tensors(tmp_path / "old.safetensors", tensors, meta)
    old = load_model(tmp_path / "old.safetensors")
    assert not getattr(old.model_cfg, key) and old.model_cfg == tiny_model.model_cfg


def test_half_precision_save_is_close(tmp_path, tiny_model):
    path = tmp_path / "m16.safetensors"
    save_model(tiny_model, path, half=True)
    loaded = load_model(path)
    for name, tensor in loaded.decoder.state_dict().items():
        assert tensor.dtype == torch.float32
        assert torch.allclose(tensor, tiny_model.decoder.state_dict()[name], atol=1e-2), name


@pytest.mark.parametrize("zipped", [True, False])
def test_pickle_checkpoint_is_refused(tmp_path, tiny_model, zipped):
    path = tmp_path / "model.pt"
    torch.save(tiny_model.decoder.state_dict(), path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(path)


def test_safetensors_whose_first_byte_looks_like_pickle_loads(tmp_path):
    # The file starts with the header length; when its low byte is 0x80 the file opens like a pickle does.
    tensors = {"w": torch.arange(6.0).view(2, 3)}
    for pad in range(256):
        path = tmp_path / f"padded{pad}.safetensors"
        save_tensors(path, tensors, {"format": "captioner", "pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length ending in 0x80")
    loaded, metadata = load_tensors(path)
    assert torch.equal(loaded["w"], tensors["w"]) and metadata["pad"] == "x" * pad


@pytest.mark.parametrize("content", [b"", b"garbage that is not safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{}"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        load_model(path)


def test_truncated_checkpoint_is_a_clear_error(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="damaged"):
        load_model(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_write_is_atomic(tmp_path, tiny_model, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("captioner.models.checkpoint.os.replace", crash)
    with pytest.raises(OSError):
        save_model(tiny_model, path, half=True)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp file left behind


def test_ship_script_writes_fp16_weights_and_the_model_card(tiny_model, tmp_path):
    tiny_model.info = {"data": "csv", "train_images": 7, "val_images": 2, "epoch": 3,
                       "metrics": {"split": "dev", "CIDEr": 1.5}, "recipe": {"train": {"epochs": 3}}}
    best, shipped = tmp_path / "best.safetensors", tmp_path / "shipped.safetensors"
    save_model(tiny_model, best)
    script = Path(__file__).resolve().parents[1] / "scripts" / "ship_model.py"
    subprocess.run([sys.executable, str(script), str(best), str(shipped)], check=True, capture_output=True)
    model = load_model(shipped)
    assert "Flickr8k" in model.info["name"] and "Hodosh" in model.info["data"] and model.info["license"]
    assert model.info["selection"] == {"metric": "CIDEr-D", "split": "dev", "CIDEr": 1.5}
    assert model.info["epoch"] == 3 and model.info["recipe"] == {"train": {"epochs": 3}}
    with safe_open(shipped, "pt") as fh:
        assert {fh.get_tensor(k).dtype for k in fh.keys() if fh.get_tensor(k).is_floating_point()} == {torch.float16}
    for name, weight in model.decoder.state_dict().items():
        assert torch.allclose(weight.float(), tiny_model.decoder.state_dict()[name], atol=1e-3)


def test_ship_script_can_set_the_length_penalty(tiny_model, tmp_path):
    tiny_model.info = {"metrics": {"split": "dev", "CIDEr": 1.5}}
    best, shipped = tmp_path / "best.safetensors", tmp_path / "shipped.safetensors"
    save_model(tiny_model, best)
    script = Path(__file__).resolve().parents[1] / "scripts" / "ship_model.py"
    run = [sys.executable, str(script), str(best), str(shipped), "--length-penalty"]
    subprocess.run([*run, "0.7"], check=True, capture_output=True)
    model = load_model(shipped)
    assert model.decode_cfg.length_penalty == 0.7
    # the selection scores keep the penalty they were measured with
    assert model.info["selection"]["length_penalty"] == tiny_model.decode_cfg.length_penalty
    failed = subprocess.run([*run, "-1"], capture_output=True, text=True)
    assert failed.returncode != 0 and "decode.length_penalty must be in [0, 2]" in failed.stderr


def test_shape_check_builds_the_model_without_initialising_it():
    """load_model's shape check builds the decoder on the meta device under `NoInit(constants=True)`: the
    initialisers are skipped (they cost about 1 s of every load through PyTorch's Python reference kernels),
    nothing else is."""
    cpu = torch.ones(3, 4)
    with NoInit(constants=True):
        torch.nn.init.normal_(cpu)
        torch.nn.init.kaiming_uniform_(tensor=cpu, a=1.0)
        cpu.uniform_()
        cpu.zero_()
        doubled = cpu * 2  # other ops run as usual
    assert torch.equal(cpu, torch.ones(3, 4)) and torch.equal(doubled, torch.full((3, 4), 2.0))
    with torch.device("meta"), NoInit(constants=True):
        layer = torch.nn.Linear(5, 7)
    assert layer.weight.device.type == "meta" and layer.weight.shape == (7, 5)
    torch.nn.init.normal_(cpu)  # outside it, initialisers run again
    assert not torch.equal(cpu, torch.ones(3, 4))


def test_no_init_skips_only_the_random_draws_by_default():
    """The real modules that a load overwrites skip the random draws; constants still run (a buffer that no
    state dict carries may be set by one)."""
    cpu = torch.ones(3, 4)
    with NoInit():
        torch.nn.init.normal_(cpu)
        torch.nn.init.xavier_uniform_(cpu)
        assert torch.equal(cpu, torch.ones(3, 4))
        cpu.fill_(5.0)
        norm = torch.nn.BatchNorm2d(4)
    assert torch.equal(cpu, torch.full((3, 4), 5.0))
    assert torch.equal(norm.weight, torch.ones(4)) and torch.equal(norm.running_var, torch.ones(4))


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused(tmp_path, tiny_model):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model, path)
    tensors, meta = load_tensors(path)
    meta["model"]["hidden_dim"] = meta["model"]["hidden_dim"] * 2  # the config claims a bigger decoder
    save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match="weights do not match the stored config"):
        load_model(tmp_path / "bad.safetensors")


def test_metadata_with_undecodable_file_name_bytes_round_trips(tiny_model, tmp_path):
    """A recipe naming a file whose name is not UTF-8 (os.fsdecode's surrogate escapes) is saved and read back
    as it was, instead of failing at the first checkpoint after hours of training."""
    name = b"caf\xe9/photos".decode("utf-8", "surrogateescape")
    tiny_model.info = {"recipe": {"data": {"root": name}}, "note": "café"}
    save_model(tiny_model, tmp_path / "m.safetensors")
    assert load_model(tmp_path / "m.safetensors").info == tiny_model.info


def test_an_unreadable_checkpoint_is_a_checkpoint_error_not_a_write_error(tiny_checkpoint, monkeypatch):
    import captioner.models.checkpoint as checkpoint

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint, "open", denied, raising=False)  # as a file the user cannot read
    with pytest.raises(CheckpointError, match=r"tiny.safetensors: cannot read \(Permission denied\)"):
        checkpoint.load_tensors(tiny_checkpoint)


def test_a_fifo_given_as_checkpoint_is_named_not_a_regular_file_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)  # reading it would wait for a writer for good
    with pytest.raises(CheckpointError, match="model.safetensors: not a regular file"):
        load_tensors(fifo)  # was "checkpoint file not found", for a file that is there
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_tensors(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, tiny_model, value):
    """It loaded and captioned: one word repeated, NaN scores, and `Caption.ok` true."""
    good = tmp_path / "good.safetensors"
    save_model(tiny_model, good)
    tensors, meta = load_tensors(good)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name][0] = value
    save_tensors(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError, match=f"{name} holds NaN or infinite weights"):
        load_model(tmp_path / "bad.safetensors")


def test_weights_beyond_fp16_are_not_shipped_as_infinities(tmp_path, tiny_model):
    with torch.no_grad():
        next(tiny_model.decoder.parameters())[0] = 1e6  # finite in fp32, inf in fp16
    save_model(tiny_model, tmp_path / "fp32.safetensors")
    with pytest.raises(CheckpointError, match="in fp16"):
        save_model(tiny_model, tmp_path / "fp16.safetensors", half=True)
    assert not (tmp_path / "fp16.safetensors").exists()
