"""The moving average of the weights: its arithmetic, swapping it in and out, and saving it with a run."""

import pytest
import torch

from captioner.training.ema import WeightAverage, averaged


def _module(value: float) -> torch.nn.Module:
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(value)
    return module


def test_average_follows_the_weights_with_a_warming_decay():
    module = _module(0.0)
    ema = WeightAverage(module, decay=0.9)
    expected = 0.0
    for n in range(1, 30):
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float(n))
        ema.update(module)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * n
        assert ema.shadow["0.weight"] == pytest.approx(torch.full((2, 3), expected), rel=1e-5)
    assert "1.num_batches_tracked" not in ema.shadow  # integer buffers are not averaged


def _averaged_once(start: float, then: float) -> tuple[torch.nn.Module, WeightAverage]:
    """A module at `start`, its average, then the module's first weight moved to `then` and averaged in."""
    module = _module(start)
    ema = WeightAverage(module, decay=0.5)
    with torch.no_grad():
        module[0].weight.fill_(then)
    ema.update(module)
    return module, ema


def test_applied_swaps_the_average_in_and_restores_the_live_weights():
    module, ema = _averaged_once(1.0, 3.0)
    average = ema.shadow["0.weight"].clone()
    assert not torch.equal(average, module[0].weight)
    with averaged(ema, module):
        assert torch.equal(module[0].weight, average)
    assert torch.equal(module[0].weight, torch.full((2, 3), 3.0))
    with pytest.raises(RuntimeError), ema.applied(module):  # restored even when the block fails
        raise RuntimeError("boom")
    assert torch.equal(module[0].weight, torch.full((2, 3), 3.0))
    with averaged(None, module):
        assert torch.equal(module[0].weight, torch.full((2, 3), 3.0))


def test_state_round_trip_and_reset():
    module, ema = _averaged_once(1.0, 5.0)
    other = WeightAverage(_module(0.0), decay=0.5)
    other.load(ema.state())
    assert other.updates == 1 and torch.equal(other.shadow["0.weight"], ema.shadow["0.weight"])
    ema.reset(module)
    assert ema.updates == 0 and torch.equal(ema.shadow["0.weight"], module[0].weight)
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(module, decay=1.0)


def test_the_best_checkpoint_holds_the_average_and_the_run_state_both(tmp_path, tiny_model):
    from captioner.models.checkpoint import load_model, load_tensors
    from captioner.training import loop as training
    from captioner.training.run_state import Progress

    decoder = tiny_model.decoder
    ema = WeightAverage(decoder, decay=0.5)
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(1.0)
    ema.update(decoder)
    live = {k: v.clone() for k, v in decoder.state_dict().items()}
    optimizer = torch.optim.AdamW(decoder.parameters())
    training.checkpoint_epoch(tmp_path, tiny_model, optimizer, Progress(), torch.Generator(), True, ema)
    best = load_model(tmp_path / "best.safetensors").decoder.state_dict()
    tensors, _ = load_tensors(tmp_path / "train_state.safetensors")
    for name, average in ema.shadow.items():
        assert torch.allclose(best[name].float(), average, atol=1e-3)  # the average, not the live weights
        assert not torch.allclose(best[name].float(), live[name], atol=1e-3) or torch.equal(average, live[name])
        assert torch.equal(tensors[f"model.{name}"], live[name]) and torch.equal(tensors[f"extra.ema.{name}"], average)
    assert all(torch.equal(v, live[k]) for k, v in decoder.state_dict().items())  # live weights back in place


def test_applied_refuses_a_module_with_other_names():
    module, ema = _averaged_once(1.0, 3.0)
    wrapper = torch.nn.Sequential(module)  # names gain a "0." prefix, as under a DDP wrapper's "module."
    with pytest.raises(ValueError, match="not the ones"), ema.applied(wrapper):
        pass
