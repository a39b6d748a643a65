"""Building modules without drawing their initial weights, for weights that are loaded over them at once."""

from __future__ import annotations

from torch.overrides import TorchFunctionMode

RANDOM = frozenset({"normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                    "xavier_normal_", "trunc_normal_", "orthogonal_"})
"""The random initialisers of `torch.nn.init` and their tensor methods."""
CONSTANT = frozenset({"zero_", "zeros_", "ones_", "fill_", "constant_"})


class NoInit(TorchFunctionMode):
    """Within it, the random in-place initialisers (normal_, uniform_, kaiming_uniform_, ...) do nothing, and
    with `constants=True` the constant ones (zero_, fill_, ...) too.

    Why: a module built to receive a strict `load_state_dict` has every drawn value overwritten. On the meta
    device `normal_` runs PyTorch's Python reference kernels, slow on first use: about 1 s of every
    `Captioner.load()` (1.09 against 0.12 s on a 2-core AMX Xeon). On the CPU the draws of the pretrained
    encoder and the decoder were 0.05-0.06 s of every `Captioner.load()` on a 2-core AVX2 EPYC
    (docs/performance.md). Constants run by default: they are cheap, and a buffer that no state dict carries
    may be set by one. Skipping draws also leaves the global random stream where it was, so training, whose
    loads follow its seeding, does not use it.
    """

    def __init__(self, constants: bool = False):
        super().__init__()
        self.skipped = RANDOM | CONSTANT if constants else RANDOM

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.skipped:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)
