import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from captioner import Caption, Captioner, CheckpointError, ImageLoadError
from captioner.models.checkpoint import save_model
from captioner.models.encoder import build_encoder
from captioner.runtime.choice import cpu_has_vnni
from captioner.runtime.int8 import CalibrationError
from tests.conftest import make_model, write_images
from tests.test_speed_paths import SCENES, scene


@pytest.fixture
def captioner(tiny_model) -> Captioner:
    """The default precision with its fast paths built, as after a first job of more than SMALL_JOB images: the
    paths these tests check (a small job's reference modules: test_speed_paths)."""
    cap = Captioner(tiny_model, build_encoder("efficientnet_lite0", pretrained=False))
    cap.warmup()
    return cap


def test_paths_pil_and_mixed_give_one_caption_each(tmp_path, captioner):
    paths = write_images(tmp_path, 3)
    pil = Image.open(paths[1]).convert("RGB")
    results = captioner.caption([paths[0], pil, str(paths[2])], beam_size=3, n_best=2)
    assert [type(r) for r in results] == [Caption] * 3
    assert results[0].source == str(paths[0])
    by_path = captioner.caption(paths, beam_size=3, n_best=2, batch_size=2)
    assert [r.text for r in results] == [r.text for r in by_path]
    for r in results:
        assert r.text == " ".join(r.tokens)
        assert len(r.alternatives) == 2 and r.alternatives[0].text == r.text
        assert r.alternatives[0].score >= r.alternatives[1].score


def test_batch_size_does_not_change_results(tmp_path, captioner):
    paths = write_images(tmp_path, 5)
    one = captioner.caption(paths, batch_size=1)
    many = captioner.caption(paths, batch_size=4)
    assert [r.text for r in one] == [r.text for r in many]
    assert [r.score for r in one] == pytest.approx([r.score for r in many], abs=1e-4)


def test_attention_and_gates_on_request(tmp_path, captioner):
    [path] = write_images(tmp_path, 1)
    plain = captioner.caption([path])[0]
    assert plain.attention is None and plain.gates is None
    rich = captioner.caption([path], return_attention=True, return_gates=True)[0]
    steps = rich.attention.shape[0]
    assert rich.attention.shape == (steps, 7, 7)
    assert steps in (len(rich.tokens), len(rich.tokens) + 1)
    assert set(rich.gates) == {"input", "forget", "output", "cell"}
    assert rich.text == plain.text


def test_thread_safe(tmp_path, captioner):
    paths = write_images(tmp_path, 4)
    expected = [r.text for r in captioner.caption(paths)]
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: [r.text for r in captioner.caption(paths, batch_size=2)], range(6)))
    assert all(run == expected for run in runs)


def test_bad_image_raises_or_is_skipped(tmp_path, captioner):
    paths = write_images(tmp_path, 2)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageLoadError, match="bad.jpg"):
        captioner.caption([paths[0], bad])
    results = captioner.caption([paths[0], bad, paths[1]], on_error="skip")
    assert [r.ok for r in results] == [True, False, True]
    assert "bad.jpg" in results[1].error


def test_load_given_checkpoint(tiny_checkpoint, tmp_path):
    cap = Captioner.load(tiny_checkpoint)
    [path] = write_images(tmp_path, 1)
    assert cap.caption([path])[0].ok


def test_load_gives_the_pretrained_encoder_and_the_stored_decoder(tiny_checkpoint, tiny_model):
    """`Captioner.load` builds both halves without drawing random weights (`NoInit`): every tensor must still
    be the pretrained or stored one."""
    cap = Captioner.load(tiny_checkpoint)
    expected = build_encoder(tiny_model.model_cfg.encoder, image_size=tiny_model.model_cfg.image_size)
    mine, theirs = cap.encoder.state_dict(), expected.state_dict()
    assert list(mine) == list(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    stored = tiny_model.decoder.state_dict()
    assert all(torch.equal(v, stored[k]) for k, v in cap.model.decoder.state_dict().items())


def test_checkpoint_image_size_reaches_the_encoder(tmp_path, vocab, tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, image_size=256)
    path = tmp_path / "big.safetensors"
    save_model(make_model(vocab, cfg), path)
    cap = Captioner.load(path)
    assert cap.encoder.preprocess.size == 256 and cap.encoder.grid_size == 8
    [path] = write_images(tmp_path, 1)
    [result] = cap.caption([path], return_attention=True)
    assert result.ok and result.attention.shape[1:] == (8, 8)


def test_load_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Captioner.load(tmp_path / "none.safetensors")


def test_shipped_model_loads_and_captions(tmp_path):
    cap = Captioner.load()
    assert "Flickr8k" in cap.model.info["data"]
    assert cap.model.decode_cfg.beam_size == 3
    image = Image.new("RGB", (320, 240), (40, 120, 200))
    result = cap.caption([image], n_best=3)[0]
    assert result.ok and 2 <= len(result.tokens) <= cap.model.decode_cfg.max_length
    assert all(word in cap.vocab.stoi for word in result.tokens)
    assert len(result.alternatives) == 3


def test_shipped_model_captions_with_its_int8_calibration():
    """The shipped model comes with the int8 calibration of its own encoder (else loading would refuse), and its
    int8 features stay near the fp32 ones: on these generated scenes 9-32% apart (relative L2 distance), where
    two different scenes are 45-133% apart; on 64 dev photos 14%. With 7-bit weights (a CPU without VNNI) the
    scenes are 19-49% apart (measured on an AVX2-only AMD EPYC)."""
    pytest.importorskip("onnxruntime")
    quantised, fp32 = Captioner.load(precision="int8"), Captioner.load()
    images = [scene(c, s, 2) for c, s in SCENES]
    pixels = torch.stack([fp32.preprocess(image) for image in images])
    a, b = quantised.encode(pixels), fp32.encode(pixels)
    assert a.shape == b.shape == (16, 81, fp32.encoder.feature_dim)
    distance = (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)
    assert 0 < distance.max().item() <= (0.42 if cpu_has_vnni() else 0.55)
    assert all(c.ok for c in quantised.caption(images))


def test_int8_without_a_calibration_is_refused_at_load(tiny_checkpoint, tiny_model):
    expected = tiny_checkpoint.with_suffix(".int8.json")
    with pytest.raises(CalibrationError, match=re.escape(f"{expected}: no int8 calibration file")):
        Captioner.load(tiny_checkpoint, precision="int8")
    with pytest.raises(CalibrationError, match="needs int8_calibration"):
        Captioner(tiny_model, build_encoder("efficientnet_lite0"), precision="int8")


def test_names_label_byte_inputs(tmp_path, captioner):
    [path] = write_images(tmp_path, 1)
    results = captioner.caption([path.read_bytes(), b"not an image"], names=["beach.jpg", "notes.jpg"],
                                on_error="skip")
    assert [r.source for r in results] == ["beach.jpg", "notes.jpg"]
    assert results[0].ok and results[1].error.startswith("notes.jpg: ")
    with pytest.raises(ValueError, match="2 names for 1 images"):
        captioner.caption([path], names=["a", "b"])


def test_no_repeat_ngram_defaults_to_the_checkpoint_and_can_be_overridden(tmp_path, tiny_model):
    def repeats(words, n=3):
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        return len(grams) != len(set(grams))

    paths = write_images(tmp_path, 6)
    tiny_model.decode_cfg = dataclasses.replace(tiny_model.decode_cfg, max_length=16, no_repeat_ngram=3)
    cap = Captioner(tiny_model, build_encoder("efficientnet_lite0", pretrained=False))
    free = cap.caption(paths, no_repeat_ngram=0)
    assert any(repeats(r.tokens) for r in free)  # the untrained model loops
    assert not any(repeats(r.tokens) for r in cap.caption(paths))
