import pytest
import torch

from captioner.config import ModelConfig
from captioner.models.decoder import build_decoder

KINDS = [("attention", False), ("show_tell", False), ("attention", True)]  # (decoder, deep output)


@pytest.mark.parametrize("kind,deep", KINDS)
@pytest.mark.parametrize("feature_dim", [0, 20])
@pytest.mark.parametrize("head", [0, 14])
def test_teacher_forcing_shapes_and_gradients(kind, deep, feature_dim, head):
    cfg = ModelConfig(decoder=kind, embed_dim=8, hidden_dim=12, attention_dim=6, feature_dim=feature_dim, dropout=0.1,
                      deep_output=deep, encoder_head=head)
    decoder = build_decoder(cfg, vocab_size=30, encoder_dim=16)
    features = torch.randn(4, 9, 16)
    captions = torch.randint(0, 30, (4, 7))
    out = decoder(features, captions)
    logits, alphas = out.padded(), out.attention
    assert logits.shape == (4, 6, 30)
    assert out.logits.shape == (24, 30) and torch.equal(out.targets, captions[out.rows, out.steps + 1])
    if kind == "attention":
        assert alphas.shape == (4, 6, 9)
        assert torch.allclose(alphas.sum(-1), torch.ones(4, 6), atol=1e-5)
    else:
        assert alphas is None
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), captions[:, 1:].reshape(-1))
    loss.backward()
    grads = dict(decoder.named_parameters())
    # The attention score's bias shifts every energy alike, which the softmax ignores: its gradient is zero up to
    # rounding (whether it came out exactly zero depended on the random draw, and so on test order).
    shift = grads.pop("att_score.bias", None)
    assert shift is None or (shift.grad is not None and shift.grad.abs().max().item() < 1e-5)
    assert [n for n, p in grads.items() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize("kind,deep", KINDS)
@pytest.mark.parametrize("head", [0, 14])
def test_step_matches_teacher_forcing(kind, deep, head):
    cfg = ModelConfig(decoder=kind, embed_dim=8, hidden_dim=12, attention_dim=6, feature_dim=10, dropout=0.0,
                      deep_output=deep, encoder_head=head)
    decoder = build_decoder(cfg, vocab_size=20, encoder_dim=16).eval()
    features, captions = torch.randn(2, 9, 16), torch.randint(0, 20, (2, 5))
    logits = decoder(features, captions).padded()
    memory, state = decoder.init(features)
    for t in range(4):
        out = decoder.step(captions[:, t], memory, state)
        state = out.state
        assert torch.allclose(out.logits, logits[:, t], atol=1e-5)


def test_the_encoder_head_comes_first_and_older_names_stay():
    """A checkpoint without the head keeps `project.0` for the feature projection."""
    plain = build_decoder(ModelConfig(feature_dim=10), vocab_size=20, encoder_dim=16)
    headed = build_decoder(ModelConfig(feature_dim=10, encoder_head=14), vocab_size=20, encoder_dim=16)
    assert plain.encoder_head is None and plain.project[0].weight.shape == (10, 16)
    assert headed.encoder_head is headed.project[0] and headed.encoder_head.weight.shape == (14, 16)
    assert headed.project[2].weight.shape == (10, 14)
    x = torch.full((1, 1, 16), -1.0)
    headed.encoder_head.bias.data.fill_(10.0)  # ReLU6 after the head caps its output at 6
    assert torch.equal(headed.project[:2](x), torch.full((1, 1, 14), 6.0))
    unprojected = build_decoder(ModelConfig(feature_dim=0, encoder_head=14), vocab_size=20, encoder_dim=16)
    assert unprojected.feature_size == 14


def test_gates_do_not_change_the_result():
    cfg = ModelConfig(embed_dim=8, hidden_dim=12, attention_dim=6, feature_dim=10, dropout=0.0)
    decoder = build_decoder(cfg, vocab_size=20, encoder_dim=16).eval()
    memory, state = decoder.init(torch.randn(3, 9, 16))
    tokens = torch.tensor([1, 4, 5])
    plain = decoder.step(tokens, memory, state)
    explained = decoder.step(tokens, memory, state, return_gates=True)
    assert plain.gates is None
    assert torch.allclose(plain.logits, explained.logits, atol=1e-5)
    assert torch.allclose(explained.gates["cell"], explained.state["c"])


@pytest.mark.parametrize("deep", [False, True])
def test_length_sorted_forward_skips_padding_without_changing_results(deep):
    cfg = ModelConfig(embed_dim=8, hidden_dim=12, attention_dim=6, feature_dim=10, dropout=0.0, deep_output=deep)
    decoder = build_decoder(cfg, vocab_size=20, encoder_dim=16).eval()
    features = torch.randn(2, 9, 16)
    lengths = torch.tensor([7, 5, 3])
    captions = torch.randint(4, 20, (3, 7))
    image_index = torch.tensor([1, 0, 1])
    full = decoder(features.index_select(0, image_index), captions)
    full, full_alpha = full.padded(), full.attention
    fast = decoder(features, captions, image_index=image_index, lengths=lengths)
    assert fast.logits.shape[0] == int((lengths - 1).sum())  # only positions inside a caption are computed
    assert torch.equal(fast.targets, captions[fast.rows, fast.steps + 1])
    fast, fast_alpha = fast.padded(), fast.attention
    for row, n in enumerate(lengths.tolist()):
        assert torch.allclose(fast[row, : n - 1], full[row, : n - 1], atol=1e-5)
        assert torch.all(fast[row, n - 1:] == 0)
        assert torch.allclose(fast_alpha[row, : n - 1], full_alpha[row, : n - 1], atol=1e-5)


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_feature_dropout_is_its_own_knob(kind):
    features, captions = torch.randn(2, 9, 16), torch.randint(0, 20, (2, 5))

    def two_training_passes(**dropouts):
        cfg = ModelConfig(decoder=kind, embed_dim=8, hidden_dim=12, attention_dim=6, feature_dim=10, **dropouts)
        decoder = build_decoder(cfg, vocab_size=20, encoder_dim=16).train()
        return decoder(features, captions).logits, decoder(features, captions).logits

    assert torch.equal(*two_training_passes(dropout=0.0, feature_dropout=0.0))
    assert not torch.equal(*two_training_passes(dropout=0.0, feature_dropout=0.5))
    assert not torch.equal(*two_training_passes(dropout=0.5, feature_dropout=0.0))


def test_deep_output_reads_the_context_and_the_word():
    """With the deep output, the prediction changes with the context and the input word even when the LSTM's
    hidden state is held fixed; without it, the hidden state alone decides."""
    torch.manual_seed(0)
    features = torch.randn(2, 9, 16)
    for deep in (False, True):
        cfg = ModelConfig(embed_dim=8, hidden_dim=12, attention_dim=6, feature_dim=10, dropout=0.0,
                          feature_dropout=0.0, deep_output=deep)
        decoder = build_decoder(cfg, vocab_size=20, encoder_dim=16).eval()
        memory, state = decoder.init(features)
        with torch.no_grad():
            decoder.lstm.weight_ih.zero_()  # the new hidden state no longer depends on the word or the context
            a = decoder.step(torch.tensor([3, 3]), memory, state)
            b = decoder.step(torch.tensor([4, 4]), memory, state)
            memory["feats"] = memory["feats"].flip(0)  # each row's attention now reads the other image's grid
            c = decoder.step(torch.tensor([3, 3]), memory, state)
        assert torch.equal(a.state["h"], b.state["h"]) and torch.equal(a.state["h"], c.state["h"])
        assert (not torch.allclose(a.logits, b.logits)) == deep
        assert (not torch.allclose(a.logits, c.logits)) == deep
