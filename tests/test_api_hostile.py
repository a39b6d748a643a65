"""Hostile inputs to the API, the image loader, the beam search and `captioner app` (docs/robustness.md)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import Captioner
from captioner.cli import app as app_cli
from captioner.decoding import beam_search
from captioner.images import open_image
from captioner.models.encoder import build_encoder
from captioner.models.shipped import shipped_path
from tests.conftest import write_images
from tests.test_decoding import END, START, random_decoder


@pytest.fixture
def captioner(tiny_model) -> Captioner:
    """The reference modules: these tests are about arguments and streams, not the fast paths."""
    return Captioner(tiny_model, build_encoder("efficientnet_lite0", pretrained=False), precision="reference")


# --- length penalty ------------------------------------------------------------------------------------------


def test_the_search_refuses_a_length_penalty_it_cannot_rank_with(tiny_cfg, vocab):
    """length ** 40 overflows float32 from length 10 on, and -inf / inf is NaN: the search once kept no
    hypothesis (the API's `hyps[0]` an IndexError). Every caller's bound is the search's own."""
    decoder = random_decoder(tiny_cfg, vocab, seed=5)
    features = torch.randn(2, 9, 32)
    for penalty in (40.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match=r"length_penalty must be in \[0, 2\]"):
            beam_search(decoder, features, start_id=START, end_id=END, beam_size=3, length_penalty=penalty)
    got = beam_search(decoder, features, start_id=START, end_id=END, beam_size=3, n_best=3, max_length=14,
                      length_penalty=2.0)
    assert all(len(image) == 3 and all(np.isfinite(h.score) for h in image) for image in got)


@pytest.mark.parametrize("penalty", [40.0, 2.5, -0.5, float("inf"), True, "1"])
def test_the_api_refuses_a_length_penalty_outside_the_configs_range(captioner, penalty):
    with pytest.raises(ValueError, match=r"length_penalty must be a number in \[0, 2\]"):
        captioner.caption_iter([], length_penalty=penalty)


@pytest.mark.parametrize("penalty", [0, 0.0, 2.0, np.float32(1.5)])
def test_the_api_takes_a_length_penalty_inside_the_configs_range(tmp_path, captioner, penalty):
    [path] = write_images(tmp_path, 1)
    [result] = captioner.caption([path], length_penalty=penalty, max_length=12)
    assert result.ok and result.text


# --- 16-bit and premultiplied-alpha images -------------------------------------------------------------------

SIXTEEN = (np.arange(3072).reshape(48, 64) * 20).astype(np.uint16)


def _sixteen(mode: str) -> Image.Image:
    """SIXTEEN as a PIL image of a 16-bit mode (its bytes in that mode's order)."""
    order = {"I;16B": ">u2", "I;16L": "<u2", "I;16": "<u2", "I;16N": "=u2"}[mode]
    return Image.frombytes(mode, (64, 48), SIXTEEN.astype(order).tobytes())


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16N"])
def test_sixteen_bit_images_of_any_byte_order_are_scaled_as_i16_is(mode):
    """They said "point operation not supported for this mode"."""
    expected = np.asarray(open_image(_sixteen("I;16")))
    got = np.asarray(open_image(_sixteen(mode)))
    assert got.shape == (48, 64, 3) and np.array_equal(got, expected)
    assert got[-1, -1, 0] == SIXTEEN[-1, -1] // 256 and got.max() > 200  # scaled, not clipped at 255


def test_a_big_endian_sixteen_bit_tiff_is_captioned(tmp_path, captioner):
    path = tmp_path / "be16.tif"
    _sixteen("I;16B").save(path)
    assert np.array_equal(np.asarray(open_image(path)), np.asarray(open_image(_sixteen("I;16"))))
    [result] = captioner.caption([path])
    assert result.ok, result.error


def test_premultiplied_la_is_un_premultiplied_and_flattened_over_white():
    """'La' said "conversion from La to L not supported"; it is read as the 'LA' it stands for."""
    la = Image.new("LA", (3, 1))
    for x, pixel in enumerate([(100, 255), (200, 128), (50, 0)]):
        la.putpixel((x, 0), pixel)
    premultiplied = la.convert("La")
    got = np.asarray(open_image(premultiplied))[0, :, 0].astype(int)
    expected = np.asarray(open_image(la))[0, :, 0].astype(int)
    assert list(expected) == [100, 227, 255]  # opaque as is, half over white, transparent is white
    assert np.abs(got - expected).max() <= 1  # the premultiplied 8 bits round by one at most


# --- captioner app --checkpoint ------------------------------------------------------------------------------


def _app_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    app_cli.add_parser(parser.add_subparsers())
    return parser.parse_args(["app", *argv])


@pytest.fixture
def no_streamlit(monkeypatch) -> list:
    """`subprocess.call` of the app module recorded instead of run: no Streamlit server starts."""
    calls = []
    monkeypatch.setattr(app_cli.subprocess, "call", lambda cmd, **kw: calls.append((cmd, kw)) or 0)
    return calls


@pytest.mark.parametrize("name", ["flickr8k", "general"])
def test_app_takes_a_shipped_model_name(name, no_streamlit):
    """It said "checkpoint file not found: flickr8k" (exit 2), where caption and evaluate take the name."""
    assert app_cli.run(_app_args("--checkpoint", name)) == 0
    [(cmd, kw)] = no_streamlit
    assert kw["env"][app_cli.CHECKPOINT_ENV] == str(shipped_path(name).resolve())


def test_app_takes_a_checkpoint_path_relative_to_the_current_folder(tmp_path, tiny_checkpoint, no_streamlit,
                                                                    monkeypatch):
    monkeypatch.chdir(tiny_checkpoint.parent)
    assert app_cli.run(_app_args("--checkpoint", tiny_checkpoint.name)) == 0
    [(cmd, kw)] = no_streamlit
    assert kw["env"][app_cli.CHECKPOINT_ENV] == str(tiny_checkpoint.resolve())


@pytest.mark.parametrize("case, message", [("folder", "is a folder, not a checkpoint file"),
                                           ("missing", "checkpoint file not found"),
                                           ("unknown", "unknown model 'no-such-model'; shipped models: general")])
def test_app_refuses_what_the_other_commands_refuse(tmp_path, monkeypatch, no_streamlit, capsys, case, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    given = {"folder": "run", "missing": "gone.safetensors", "unknown": "no-such-model"}[case]
    assert app_cli.run(_app_args("--checkpoint", given)) == 2
    assert not no_streamlit
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_app_makes_an_inherited_relative_checkpoint_variable_absolute(tmp_path, tiny_checkpoint, no_streamlit,
                                                                      monkeypatch, capsys):
    """$CAPTIONER_CHECKPOINT=run/best.safetensors set by the caller was read from app.py's folder, where Streamlit
    runs: "checkpoint file not found", or another file of that name (the repository's runs/...) silently."""
    monkeypatch.chdir(tiny_checkpoint.parent)
    monkeypatch.setenv(app_cli.CHECKPOINT_ENV, tiny_checkpoint.name)
    assert app_cli.run(_app_args()) == 0
    [(cmd, kw)] = no_streamlit
    assert kw["env"][app_cli.CHECKPOINT_ENV] == str(tiny_checkpoint.resolve())
    monkeypatch.setenv(app_cli.CHECKPOINT_ENV, "gone.safetensors")  # checked before the server starts
    assert app_cli.run(_app_args()) == 2 and len(no_streamlit) == 1
    assert "checkpoint file not found" in capsys.readouterr().err


# --- caption_iter: a failing input, count arguments -------------------------------------------------------------


def _failing(images: list, error: Exception):
    yield from images
    raise error


@pytest.mark.parametrize("batch_size, num_workers", [(1, 2), (2, 2), (2, 0), (3, 1)])
def test_images_received_before_the_input_fails_are_captioned_then_the_error_raised(
        tmp_path, captioner, batch_size, num_workers):
    """With workers, the image decoded ahead was dropped (1 caption of 2); a partial batch always was, also
    without workers."""
    paths = write_images(tmp_path, 3)
    got = []
    with pytest.raises(RuntimeError, match="camera unplugged"):
        for result in captioner.caption_iter(_failing(paths, RuntimeError("camera unplugged")),
                                             batch_size=batch_size, num_workers=num_workers):
            got.append(result)
    assert [r.source for r in got] == [str(p) for p in paths] and all(r.ok for r in got)


@pytest.mark.parametrize("name", ["batch_size", "num_workers", "beam_size", "n_best", "max_length", "min_length",
                                  "no_repeat_ngram"])
@pytest.mark.parametrize("value", [2.5, 2.0, True, "2"])
def test_count_arguments_refuse_floats_bools_and_strings(captioner, name, value):
    """batch_size=2.5 was taken, and made the whole stream one batch; floats and bools were taken as counts."""
    with pytest.raises(ValueError, match=rf"^{name} must be an integer >= \d, got {value!r}$"):
        captioner.caption_iter([], **{name: value})


def test_min_length_above_max_length_is_refused_at_the_call(captioner):
    """The API took it, although a config's DecodeConfig refuses it: <end> was then forbidden for the whole caption
    and every caption ended unfinished at max_length. Also when max_length comes from the checkpoint."""
    with pytest.raises(ValueError, match=r"^min_length \(6\) must not exceed max_length \(5\)$"):
        captioner.caption_iter([], max_length=5, min_length=6)
    default = captioner.decode_defaults.max_length
    with pytest.raises(ValueError, match=rf"^min_length \({default + 1}\) must not exceed max_length"):
        captioner.caption_iter([], min_length=default + 1)
    captioner.caption_iter([], max_length=5, min_length=5)  # equal is allowed, as in DecodeConfig


def test_top_tags_refuses_a_float(captioner):
    with pytest.raises(ValueError, match=r"^top_tags must be an integer >= 1, got 2.5$"):
        captioner.caption_iter([], return_tags=True, top_tags=2.5)


def test_count_arguments_take_numpy_integers(tmp_path, captioner):
    """beam_size, n_best and max_length as numpy integers were refused ("got np.int64(3)")."""
    paths = write_images(tmp_path, 3)
    counts = {"beam_size": np.int64(3), "n_best": np.int32(2), "max_length": np.int64(6),
              "min_length": np.int16(1), "no_repeat_ngram": np.uint8(0), "batch_size": np.int64(2),
              "num_workers": np.int64(1)}
    got = captioner.caption(paths, **counts)
    expected = captioner.caption(paths, **{k: int(v) for k, v in counts.items()})
    assert [(r.text, len(r.alternatives)) for r in got] == [(r.text, 2) for r in expected]


def test_a_single_image_still_checks_num_workers(tmp_path, captioner):
    """caption() of one image decodes in the calling thread; a bad num_workers is refused all the same."""
    [path] = write_images(tmp_path, 1)
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        captioner.caption([path], num_workers=1.5)



def test_caption_iter_with_fewer_or_more_names_than_images_raises_after_the_named_ones(tmp_path, captioner):
    """zip() stopped at the shorter: five images with two names gave two captions and no error."""
    paths = write_images(tmp_path, 5)
    got = []
    with pytest.raises(ValueError, match="names ran out at image 3"):
        for result in captioner.caption_iter(paths, names=["a", "b"], batch_size=2, num_workers=0):
            got.append(result.source)
    assert got == ["a", "b"]  # what was named is captioned first, as for any failing input
    with pytest.raises(ValueError, match="more names than the 2 images"):
        list(captioner.caption_iter(paths[:2], names=iter(["a", "b", "c"]), num_workers=0))
    assert [r.source for r in captioner.caption_iter(paths[:2], names=("x", "y"))] == ["x", "y"]


def test_a_path_object_is_never_a_shipped_models_name(tmp_path, monkeypatch):
    """Path("./general") drops its "./", so os.fspath gave "general" and the shipped model was loaded instead of
    the user's file ./general. An empty name was "checkpoint .: is a folder"."""
    from pathlib import Path

    from captioner.models.shipped import SHIPPED, UnknownModelError, resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "general").write_bytes(b"not a checkpoint")
    assert resolve(Path("./general")) == Path("general") and resolve("./general") == Path("./general")
    assert resolve("general") == shipped_path("general") and "general" in SHIPPED
    with pytest.raises(UnknownModelError, match="no model given"):
        resolve("")
    from captioner.models.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):  # the user's (damaged) file is what is read, not the shipped model
        Captioner.load(Path("./general"))


def test_a_generator_or_other_iterable_of_images_is_captioned_as_many(tmp_path, captioner):
    """caption(generator) was one image of an unsupported type ("<generator #0>: unsupported input type"); so were a
    deque and a dict's keys. A set is refused: its order is arbitrary."""
    paths = write_images(tmp_path, 3)
    expected = [r.text for r in captioner.caption(paths)]
    assert [r.text for r in captioner.caption(p for p in paths)] == expected
    from collections import deque

    assert [r.text for r in captioner.caption(deque(paths))] == expected
    assert [r.text for r in captioner.caption({p: 1 for p in paths}.keys())] == expected
    with pytest.raises(ValueError, match="unordered set"):  # names would be paired in an arbitrary order
        captioner.caption(set(paths), names=["a", "b", "c"])
    [array] = captioner.caption(np.zeros((4, 4, 3), dtype=np.uint8), on_error="skip")  # one input, not 4 rows
    assert not array.ok
    import io

    [one] = captioner.caption(io.BytesIO(paths[0].read_bytes()), on_error="skip")  # a file object is one input
    assert not one.ok


def test_an_unforeseen_failure_preparing_one_image_is_that_images_error(tmp_path, captioner, monkeypatch):
    """A RuntimeError from the resize (a 1 x 60,000,000 PNG asked for 40 GB) ended the whole job; now it is the
    image's error, and the other images are captioned."""
    paths = write_images(tmp_path, 3)
    prep = captioner.encoder.preprocess
    original = type(prep).to_uint8

    def to_uint8(self, image):
        if image.size == (1, 1):
            raise RuntimeError("you tried to allocate 40320000000 bytes")
        return original(self, image)

    monkeypatch.setattr(type(prep), "to_uint8", to_uint8)
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    for workers in (0, 2):
        out = captioner.caption([paths[0], tiny, paths[1]], on_error="skip", num_workers=workers)
        assert [r.ok for r in out] == [True, False, True]
        assert "could not be prepared (RuntimeError: you tried to allocate" in out[1].error
