"""The `train` section: optimisation, schedule, validation and where a run writes."""

from __future__ import annotations

from dataclasses import dataclass

from captioner.config.checks import MAX_BEAM_SIZE, at_least, finite, not_a_file, raise_problems


@dataclass
class TrainConfig:
    """Optimisation, schedule, validation and output settings."""

    out_dir: str = "runs/flickr8k"
    """Run directory: checkpoints, resolved config, metrics log and curves."""
    epochs: int = 20
    """Maximum number of epochs."""
    batch_size: int = 64
    """Images per batch (each image contributes captions_per_image captions)."""
    captions_per_image: int = 5
    """How many of an image's reference captions are trained on per step."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    encoder_head_lr: float = 1.0
    """Learning rate of the tuned encoder head (`model.encoder_head`) relative to the decoder's. The head starts
    from pretrained weights and the decoder from random ones, yet on Flickr8k a tenth of the rate did worse (best
    dev CIDEr-D 0.5472, at its last epoch, against 0.5550; one run each)."""
    warmup_steps: int = 200
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.05
    """The cosine schedule decays to lr * min_lr_ratio."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    word_dropout: float = 0.0
    """Probability that a teacher-forced input word is shown as <unk> (the word to predict is unchanged)."""
    attention_reg: float = 1.0
    """Weight of the doubly stochastic attention penalty (Show, Attend and Tell eq. 14)."""
    grad_clip: float = 5.0
    """Gradient norm clip (0 disables)."""
    seed: int = 0
    """Seed for weights, shuffling and dropout, 0 to 2^32 - 1."""
    patience: int = 4
    """Stop after this many epochs without a better validation CIDEr (0 disables early stopping)."""
    val_max_images: int = 0
    """Decode at most this many validation images per epoch (0 = all)."""
    ema_decay: float = 0.0
    """Decay of the moving average of the weights that is validated and kept as the model (0 = no average); the
    decay after n steps is min(ema_decay, (1 + n) / (10 + n)), so short runs are not dominated by the start."""
    scst_epochs: int = 0
    """Self-critical sequence training epochs with a CIDEr-D reward after cross-entropy (0 = none)."""
    scst_lr: float = 2e-5
    """Learning rate during self-critical training."""
    scst_samples: int = 5
    """Sampled captions per image in self-critical training (their mean reward is the baseline)."""
    scst_candidates: str = "sample"
    """Where self-critical candidates come from: `sample` (sampled from the model) or `beam` (the n-best list of
    a beam search of width scst_samples)."""
    scst_dropout: bool = False
    """Keep dropout on while self-critical candidates are drawn and scored. Off (the default), the candidates
    and their rewards are those of the model that is validated and shipped."""
    init_from: str = ""
    """Start from a trained model instead of random weights: a shipped model's name (`captioner models` lists
    them) or a checkpoint path. The run keeps its vocabulary (`data.min_word_count` is not applied) and its
    weights, scores it on the validation splits as epoch 0 (the score a later epoch must beat to be kept), then
    trains `epochs` cross-entropy epochs at `lr` (lower it: the model is trained already) and `scst_epochs`
    self-critical ones; `epochs: 0` goes straight to self-critical training. The `model` section must describe
    the starting model's network (only the dropout rates may differ). `--resume` continues from the run's own
    state and does not read this model again."""
    num_workers: int = 0
    """Image-decoding worker processes while extracting features."""
    skip_cache_check: bool = False
    """Trust cached features without re-checking the image files' size and modification time."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("batch_size", "captions_per_image"):
            if getattr(self, name) < 1:
                problems.append(f"train.{name} must be >= 1")
        if self.epochs < (0 if self.init_from else 1):
            problems.append("train.epochs must be >= 1 (or >= 0 with train.init_from)")
        if self.init_from and not self.epochs and not self.scst_epochs:
            problems.append("train.init_from with train.epochs: 0 needs train.scst_epochs >= 1")
        if not 0 <= self.seed < 2**32:  # torch.manual_seed overflowed past 64 bits, after the dry run passed
            problems.append(f"train.seed must be in 0..{2**32 - 1}, got {str(self.seed)[:40]}")
        if not self.lr > 0:  # also nan
            problems.append(f"train.lr must be > 0, got {self.lr}")
        if self.encoder_head_lr < 0:
            problems.append("train.encoder_head_lr must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append("train.label_smoothing must be in [0, 1)")
        if not 0.0 <= self.word_dropout < 1.0:
            problems.append("train.word_dropout must be in [0, 1)")
        if self.scst_candidates not in ("sample", "beam"):
            problems.append(f"train.scst_candidates must be 'sample' or 'beam', got {self.scst_candidates!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append("train.ema_decay must be in [0, 1)")
        problems += finite(self, "train")
        problems += at_least(self, "train", {"warmup_steps": 0, "patience": 0, "val_max_images": 0,
                                              "scst_epochs": 0, "scst_samples": 1, "num_workers": 0})
        for name in ("weight_decay", "grad_clip", "attention_reg"):
            if getattr(self, name) < 0:
                problems.append(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.scst_samples > MAX_BEAM_SIZE:  # with scst_candidates: beam, the width of a beam search
            problems.append(f"train.scst_samples must be <= {MAX_BEAM_SIZE}, got {self.scst_samples}")
        if self.scst_lr <= 0:
            problems.append(f"train.scst_lr must be > 0, got {self.scst_lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.out_dir:
            problems.append("train.out_dir must not be empty")
        problems += not_a_file(self.out_dir, "train.out_dir")
        raise_problems(problems)
