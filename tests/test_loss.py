"""The teacher-forcing loss and word dropout."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from captioner.config import Config, ConfigError, TrainConfig
from captioner.data.dataset import Batch
from captioner.training.loop import caption_loss, drop_words


def _batch(vocab) -> Batch:
    sentences = ["a dog runs on the grass", "a red ball", "the man sits"]
    encoded = [vocab.encode(s, 10) for s in sentences]
    T = max(len(e) for e in encoded)
    captions = torch.tensor([e + [vocab.pad_id] * (T - len(e)) for e in encoded])
    torch.manual_seed(0)
    return Batch(features=torch.randn(3, 4, 1280), captions=captions,
                 lengths=torch.tensor([len(e) for e in encoded]), image_index=torch.arange(3), images=torch.arange(3))


def test_drop_words_blanks_words_only_at_the_given_rate(vocab):
    captions = torch.randint(vocab.unk_id + 1, len(vocab), (200, 12))
    captions[:, 0] = vocab.start_id
    captions[:, 9] = vocab.end_id
    captions[:, 10:] = vocab.pad_id
    torch.manual_seed(0)
    dropped = drop_words(captions, 0.25, vocab)
    changed = dropped != captions
    assert (dropped[changed] == vocab.unk_id).all()
    assert not changed[:, [0, 9, 10, 11]].any()  # <start>, <end> and padding stay
    assert 0.2 < changed[:, 1:9].float().mean().item() < 0.3
    assert torch.equal(drop_words(captions, 0.0, vocab), captions)


def test_word_dropout_changes_the_inputs_but_not_the_targets(vocab, tiny_model):
    batch = _batch(vocab)
    decoder = tiny_model.decoder
    cfg = Config(train=TrainConfig(word_dropout=0.999999, attention_reg=0.0))
    blank = drop_words(batch.captions, 0.999999, vocab)
    out = decoder(batch.features, blank, batch.image_index, batch.lengths)
    expected = F.cross_entropy(out.logits, batch.captions[out.rows, out.steps + 1], ignore_index=vocab.pad_id)

    decoder.train()
    torch.manual_seed(1)
    assert caption_loss(decoder, batch, vocab, cfg).item() == pytest.approx(expected.item(), rel=1e-5)
    decoder.eval()  # validation-time losses see the true words
    plain = caption_loss(decoder, batch, vocab, dataclasses.replace(cfg, train=TrainConfig(attention_reg=0.0)))
    assert caption_loss(decoder, batch, vocab, cfg).item() == pytest.approx(plain.item(), rel=1e-6)
    assert plain.item() != pytest.approx(expected.item(), rel=1e-3)


def test_word_dropout_must_be_a_probability():
    with pytest.raises(ConfigError, match="train.word_dropout"):
        TrainConfig(word_dropout=1.0)
