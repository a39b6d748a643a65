"""Self-critical training's parts: beam candidates scored with gradients, the baseline, and one epoch's update."""

import pytest
import torch

from captioner.config import Config, DecodeConfig, TrainConfig
from captioner.data.dataset import CaptionSet
from captioner.training.run_state import Progress
from captioner.training.scst import _baseline, beam_candidates, sequence_logprobs, train_scst_epoch


def test_candidates_are_the_beam_n_best_and_their_logprob_is_the_searchs(tiny_model):
    features = torch.randn(3, 4, 1280)
    cfg = Config(train=TrainConfig(scst_samples=3, scst_candidates="beam"),
                 decode=DecodeConfig(beam_size=3, max_length=6, length_penalty=0.0))
    from captioner.decoding import beam_search

    vocab = tiny_model.vocab
    hyps = beam_search(tiny_model.decoder, features, start_id=vocab.start_id, end_id=vocab.end_id, beam_size=3,
                       n_best=3, max_length=6, banned_ids=vocab.banned_ids)
    for training in (True, False):  # the search runs without dropout; the decoder is left as it was found
        tiny_model.decoder.train(training)
        per_image = beam_candidates(tiny_model, features, cfg)
        assert per_image == [[h.tokens + ([vocab.end_id] if h.finished else []) for h in image] for image in hyps]
        assert tiny_model.decoder.training == training
    tiny_model.decoder.eval()  # no dropout here anyway; the scores must be the search's own
    owners = [i for i, cands in enumerate(per_image) for _ in cands]
    sequences = [seq for cands in per_image for seq in cands]
    logprob = sequence_logprobs(tiny_model, features, sequences, owners)
    expected = torch.tensor([h.logprob for image in hyps for h in image])
    assert logprob.shape == expected.shape and torch.allclose(logprob, expected, atol=1e-4)
    logprob.sum().backward()
    assert tiny_model.decoder.out.weight.grad is not None


def test_baseline_is_the_mean_of_the_images_other_candidates():
    reward = torch.tensor([1.0, 2.0, 3.0, 5.0, 7.0])
    owners = torch.tensor([0, 0, 0, 1, 2])
    assert torch.allclose(_baseline(reward, owners), torch.tensor([2.5, 2.0, 1.5, 5.0, 7.0]))


@pytest.mark.parametrize("candidates", ["sample", "beam"])
def test_an_epoch_moves_the_weights_and_reports_the_reward(tiny_model, candidates):
    # Every word is some image's: random candidates earn unequal, non-zero rewards, so the advantage is not zero.
    references = [["dog cat runs sits"], ["on the grass red"], ["blue ball man woman"], ["a dog on grass"]]
    data = CaptionSet([f"img{i}" for i in range(4)], torch.randn(4, 4, 1280).half(), references)
    cfg = Config(train=TrainConfig(batch_size=2, scst_samples=3, scst_candidates=candidates, scst_lr=1e-2),
                 decode=DecodeConfig(beam_size=3, max_length=6))
    before = {k: v.clone() for k, v in tiny_model.decoder.state_dict().items()}
    optimizer = torch.optim.AdamW(tiny_model.decoder.parameters(), weight_decay=0.0)  # only the reward moves them
    progress = Progress()
    reward = train_scst_epoch(tiny_model, optimizer, data, cfg, progress, torch.Generator().manual_seed(0))
    assert progress.step == 2 and 0.0 < reward < 10.0
    assert any(not torch.equal(before[k], v) for k, v in tiny_model.decoder.state_dict().items())


@pytest.mark.parametrize("dropout", [False, True])
def test_candidates_are_drawn_with_dropout_only_when_asked(tiny_model, monkeypatch, dropout):
    """train.scst_dropout: off, the candidates (and the log-probabilities the update follows) are the captions of
    the model being shipped; on, those of the dropout-perturbed one."""
    import captioner.training.scst as scst

    seen = []
    real = scst.sample_captions

    def spy(model, *args):
        seen.append(model.decoder.training)
        return real(model, *args)

    monkeypatch.setattr(scst, "sample_captions", spy)
    references = [["dog cat runs sits"], ["on the grass red"]]
    data = CaptionSet(["a", "b"], torch.randn(2, 4, 1280).half(), references)
    cfg = Config(train=TrainConfig(batch_size=2, scst_samples=2, scst_dropout=dropout),
                 decode=DecodeConfig(max_length=6))
    optimizer = torch.optim.AdamW(tiny_model.decoder.parameters())
    train_scst_epoch(tiny_model, optimizer, data, cfg, Progress(), torch.Generator().manual_seed(0))
    assert seen == [dropout]
