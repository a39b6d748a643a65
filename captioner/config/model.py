"""The `model` and `decode` sections: the network's architecture and the beam search's settings."""

from __future__ import annotations

from dataclasses import dataclass

from captioner.config.checks import MAX_BEAM_SIZE, MAX_DECODE_LENGTH, MAX_LENGTH_PENALTY, MAX_WIDTH, raise_problems


@dataclass
class ModelConfig:
    """Architecture of the captioning model."""

    encoder: str = "efficientnet_lite0"
    """Registered encoder name (see `captioner.models.encoder.available_encoders()`)."""
    encoder_weights: str | None = None
    """Local weights file for encoders that do not ship their own (e.g. resnet50). Not read back from a
    checkpoint: captioning with such a model takes the file again (`--encoder-weights`, `Captioner.load`)."""
    image_size: int = 0
    """Side of the square the encoder sees (0: the size its weights were trained at). A larger size gives a
    finer grid, one cell per 32 pixels, and objects the size the ImageNet training crops showed them at."""
    decoder: str = "attention"
    """`attention` (Show, Attend and Tell) or `show_tell` (no attention, image vector conditions the LSTM)."""
    embed_dim: int = 256
    """Word embedding size."""
    hidden_dim: int = 512
    """LSTM hidden and cell size."""
    attention_dim: int = 256
    """Size of the additive attention's hidden layer."""
    feature_dim: int = 512
    """Grid features are projected to this size once per image before attention (0 keeps the encoder's)."""
    dropout: float = 0.5
    """Dropout on what the output layer reads: the LSTM's hidden state, or the deep output."""
    feature_dropout: float = 0.5
    """Dropout on the projected grid features (what attention reads and the initial state is made from)."""
    deep_output: bool = False
    """Attention decoder only: predict each word from tanh(L_h h + L_z context + E word) (Show, Attend and Tell's
    deep output) instead of from the hidden state alone."""
    encoder_head: int = 0
    """0 keeps the encoder whole and frozen. Otherwise the width of its last 1x1 convolution (1280 for
    efficientnet_lite0), which then leaves the encoder for the decoder's first layer: initialised from the
    pretrained weights (batch norm folded in) and trained with the decoder, on features cached one layer earlier.
    This fine-tunes the top of the CNN: captioning costs the same (the product moves from the encoder to the
    decoder's per-image work), training epochs about a fifth more."""

    def __post_init__(self) -> None:
        problems = []
        if self.decoder not in ("attention", "show_tell"):
            problems.append(f"model.decoder must be 'attention' or 'show_tell', got {self.decoder!r}")
        if self.deep_output and self.decoder != "attention":
            problems.append("model.deep_output needs model.decoder: attention (it reads the attention context)")
        for name in ("embed_dim", "hidden_dim", "attention_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"model.{name} must be positive")
        for name in ("feature_dim", "encoder_head"):
            if getattr(self, name) < 0:
                problems.append(f"model.{name} must be >= 0")
        if self.image_size and not 32 <= self.image_size <= 1024:
            problems.append(f"model.image_size must be 0 (the encoder's own) or 32..1024, got {self.image_size}")
        for name in ("dropout", "feature_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"model.{name} must be in [0, 1)")
        for name in ("embed_dim", "hidden_dim", "attention_dim", "feature_dim", "encoder_head"):
            if getattr(self, name) > MAX_WIDTH:
                problems.append(f"model.{name} must be <= {MAX_WIDTH}, got {getattr(self, name)}")
        raise_problems(problems)


@dataclass
class DecodeConfig:
    """Beam search settings used for validation, evaluation and as API defaults."""

    beam_size: int = 3
    """Number of beams; 1 is greedy decoding."""
    max_length: int = 20
    """Maximum number of generated words (the end token included)."""
    min_length: int = 1
    """The end token is forbidden before this many words."""
    length_penalty: float = 0.0
    """Exponent a in score = log p / length**a; 0 ranks by total log-probability."""
    no_repeat_ngram: int = 0
    """n > 0 forbids a word that would repeat an n-gram already in the caption (0 = no such rule)."""

    def __post_init__(self) -> None:
        problems = []
        if self.beam_size < 1:
            problems.append("decode.beam_size must be >= 1")
        if self.max_length < 1:
            problems.append("decode.max_length must be >= 1")
        if not 0 <= self.min_length <= self.max_length:
            problems.append("decode.min_length must be in [0, max_length]")
        if self.no_repeat_ngram < 0:
            problems.append("decode.no_repeat_ngram must be >= 0")
        if not 0.0 <= self.length_penalty <= MAX_LENGTH_PENALTY:  # also refuses nan; the app's slider spans 0-2
            problems.append(f"decode.length_penalty must be in [0, {MAX_LENGTH_PENALTY:g}], got {self.length_penalty}")
        if self.max_length > MAX_DECODE_LENGTH:
            problems.append(f"decode.max_length must be <= {MAX_DECODE_LENGTH}, got {self.max_length}")
        if self.beam_size > MAX_BEAM_SIZE:
            problems.append(f"decode.beam_size must be <= {MAX_BEAM_SIZE}, got {self.beam_size}")
        raise_problems(problems)
