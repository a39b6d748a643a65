"""The public Python API: `Captioner.load()` and `Captioner.caption()`.

A Captioner holds an encoder and a decoder in eval mode and no other mutable state (its fast paths are built
once, under a lock), so one instance can serve several threads at once. Images are decoded and resized in a
thread pool (PIL releases the GIL while decoding) while the previous batch runs through the network.

By default the network runs on the CPU fast paths of `captioner.runtime.fast` that "auto" picks for this CPU (fp32,
or bf16 where the CPU has it natively, within a stated tolerance of fp32's captions; an exported encoder in ONNX
Runtime or OpenVINO, a fused decoder step); `precision="fp32"` gives the captions of the training-time modules,
`precision="reference"` runs those modules unchanged. `tests/test_speed_paths.py` states and checks how closely
the paths agree.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch

from captioner.api_arguments import check_decode, count_argument
from captioner.api_inputs import as_items, named, prepared_batches, until_error
from captioner.config import DecodeConfig
from captioner.decoding import Hypothesis, decode
from captioner.images import ImageInput, ImageLoadError, describe, open_image
from captioner.models.checkpoint import CaptionModel, CheckpointError, load_model
from captioner.models.encoder import NEEDS_WEIGHTS_FILE, Encoder, EncoderError, build_encoder
from captioner.models.no_init import NoInit
from captioner.models.shipped import SHIPPED
from captioner.models.shipped import resolve as resolve_model
from captioner.models.tags import TagError, TagHead, imagenet_classifier, timm_info_dir
from captioner.results import Alternative, Caption, Tag
from captioner.runtime.choice import resolve_precision
from captioner.runtime.fast import SMALL_JOB, FastPaths
from captioner.runtime.int8 import CalibrationError, calibration_path
from captioner.runtime.precisions import Precision


def default_model_path() -> Path:
    """Where the default shipped model (`captioner.models.shipped.DEFAULT`) lives inside the installed package."""
    return resolve_model(None)


class Captioner:
    """Encoder + decoder + vocabulary, ready to caption images."""

    def __init__(self, model: CaptionModel, encoder: Encoder, device: str | torch.device = "cpu",
                 precision: Precision = "auto", int8_calibration: str | os.PathLike | None = None):
        """Wrap a model and its encoder.

        Args:
            precision: "auto" picks per CPU the fastest of the paths below whose dev CIDEr-D stays within 0.01
                of fp32's (`captioner.runtime.choice.auto_precision`: "bf16" with AMX and OpenVINO,
                "bf16-encoder" with AVX512-BF16 but no AMX and OpenVINO, "bf16-decoder" with native bf16 but
                no OpenVINO, "fp32" elsewhere), after captioning the instance's first 16 images
                (`captioner.runtime.fast.SMALL_JOB`) on the reference modules: a job of a few photos finishes
                sooner than the fast paths take to build, and a batch of more builds them. "reference" runs
                the training-time fp32 modules unchanged; "fp32" the CPU fast paths in fp32: same captions,
                features within 1e-3; "bf16-decoder" an fp32 encoder and bf16 decoder products; "bf16-encoder" a
                bf16 encoder (OpenVINO where bf16 is native) and fp32 decoder step products (the per-image
                projection in bf16); "bf16" runs the encoder and the decoder's matrix products in bf16, faster
                on CPUs with bf16 instructions but it changes some captions; "int8" runs the encoder quantised
                to 8 bits from `int8_calibration`, and the decoder's products in bf16 where the CPU has bf16
                instructions (fp32 elsewhere): the fastest, and it changes more captions (tolerances:
                tests/test_speed_paths.py; on CPUs without VNNI its weights get 7 bits, so its captions can
                differ between CPUs). Off the CPU the reference modules are always used.
            int8_calibration: the calibration file for "int8" (`captioner.runtime.int8.calibration_path`).
        """
        if encoder.feature_dim != model.encoder_dim:
            raise ValueError(f"encoder {encoder.name} gives {encoder.feature_dim}-d features, the decoder expects "
                             f"{model.encoder_dim}")
        self.device = torch.device(device)
        self.model = model
        self.encoder = encoder.to(self.device).eval()
        self.decoder = model.decoder.to(self.device).eval()
        self.vocab = model.vocab
        self.precision = resolve_precision(precision, self.device)
        if self.precision == "int8" and int8_calibration is None:
            raise CalibrationError("precision='int8' needs int8_calibration, the checkpoint's calibration file")
        # "auto" also means: no fast paths for a job of a few images, which finishes sooner without building them.
        self._fast = None if self.precision == "reference" else FastPaths(
            self.encoder, self.decoder, self.precision, calibration=int8_calibration,
            defer_images=SMALL_JOB if precision == "auto" else 0)
        if self.precision == "int8":  # about a second: a bad calibration fails here, not at the first image
            self._fast.get()
        self._tag_head: TagHead | None = None  # built on the first request for tags
        self._tag_lock = threading.Lock()

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, encoder_weights: str | None = None,
             device: str | torch.device = "cpu", precision: Precision = "auto") -> Captioner:
        """Load a shipped model by name, a checkpoint by path, or the default shipped model ("general").

        Args:
            path: a shipped model's name (`captioner models` lists them: "general", "flickr8k"), a
                `.safetensors` checkpoint written by captioner, or None for the default model.
            encoder_weights: the encoder weights file, for encoders whose weights no installed package ships
                (resnet50). The path recorded in a checkpoint is never opened.
            device: torch device to run on.
            precision: "auto", "bf16", "bf16-decoder", "bf16-encoder", "fp32", "int8" or "reference" (see
                `Captioner.__init__`); "int8" reads the calibration file beside the checkpoint
                (`captioner.runtime.int8.calibration_path`).

        Raises:
            UnknownModelError: `path` is neither a shipped model's name nor a file; the message lists the names.
            EncoderError: (a ValueError) the encoder needs `encoder_weights` and none was given, or they do not
                fit it.
            CheckpointError: no shipped model, or the file is missing, damaged or pickle-based.
            CalibrationError: precision "int8" and the checkpoint's calibration file is missing, damaged or was
                measured for another encoder.
        """
        shipped = path is None or (isinstance(path, str) and path in SHIPPED)  # as `resolve_model` reads names
        path = default_model_path() if path is None else resolve_model(path)
        if shipped and not path.is_file():
            raise CheckpointError(
                f"no shipped model found at {path}; train one (captioner train) and pass its checkpoint")
        # Both halves get every weight by a strict load, so their random draws are skipped (`NoInit`: 0.06 s
        # of every load on a 2-core AVX2 EPYC); training's own loads keep them, and so its random stream.
        with NoInit():
            model = load_model(path)
            cfg = model.model_cfg
            # The checkpoint's own `encoder_weights` path is not followed: a file must not name other files.
            if cfg.encoder in NEEDS_WEIGHTS_FILE and encoder_weights is None:
                raise EncoderError(
                    f"{path}: its encoder {cfg.encoder} needs the weights file the model was trained with "
                    "(nothing is downloaded): pass encoder_weights= (captioner caption / evaluate / app: "
                    "--encoder-weights FILE)")
            encoder = build_encoder(cfg.encoder, encoder_weights, image_size=cfg.image_size,
                                    headless=bool(cfg.encoder_head))
        return cls(model, encoder, device, precision, int8_calibration=calibration_path(path))

    @property
    def decode_defaults(self) -> DecodeConfig:
        return self.model.decode_cfg

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, N, D) float32 grid features, on the fast path if enabled. `pixels` are
        normalised floats (`preprocess`) or uint8 (`Preprocess.to_uint8`), which the fast encoder normalises
        chunk by chunk or inside its graph, faster than a whole batch of floats."""
        return self._encode(pixels, self._fast.get() if self._fast is not None else None)

    def _encode(self, pixels: torch.Tensor, fast: tuple | None) -> torch.Tensor:
        with torch.inference_mode():
            if fast is not None:
                return fast[0](pixels)
            if pixels.dtype == torch.uint8:
                pixels = self.encoder.preprocess.normalize(pixels)
            return self.encoder(pixels.to(self.device))

    @property
    def step_decoder(self):
        """What beam search drives: the fused decoder on the fast path, else the model's own decoder."""
        return self._fast.get()[1] if self._fast is not None else self.decoder

    @property
    def supports_tags(self) -> bool:
        """Whether `return_tags=True` works: the encoder keeps its ImageNet classifier (EfficientNet, not
        resnet50) and timm's label files are installed."""
        try:
            imagenet_classifier(self.encoder)
            timm_info_dir()
        except TagError:
            return False
        return True

    def tag_head(self) -> TagHead:
        """The encoder's ImageNet classifier over grid features (`captioner.models.tags`), built once.

        Raises:
            TagError: (a ValueError) the encoder has no ImageNet classifier, or timm's label files are missing.
        """
        if self._tag_head is None:
            with self._tag_lock:
                if self._tag_head is None:
                    self._tag_head = TagHead.from_encoder(self.encoder).to(self.device)
        return self._tag_head

    def warmup(self, batch_size: int = 1) -> None:
        """Build the fast paths and run one dummy batch, so the first real request pays no set-up cost."""
        size = self.encoder.preprocess.size
        # uint8 pixels, as captioning passes them
        features = self.encode(torch.zeros(batch_size, 3, size, size, dtype=torch.uint8))
        decode(self.step_decoder, features, DecodeConfig(beam_size=self.model.decode_cfg.beam_size, max_length=2),
               self.vocab)

    def preprocess(self, item: ImageInput, source: str | None = None) -> torch.Tensor:
        """Open, orient, resize and normalise one image with the encoder's own preprocessing."""
        prep = self.encoder.preprocess
        return prep(open_image(item, prep.size, source))

    def caption(self, images: ImageInput | Iterable[ImageInput], beam_size: int | None = None, n_best: int = 1,
                batch_size: int = 64, max_length: int | None = None, min_length: int | None = None,
                length_penalty: float | None = None, return_attention: bool = False, return_gates: bool = False,
                on_error: Literal["raise", "skip"] = "raise", num_workers: int = 2,
                names: Sequence[str] | None = None, no_repeat_ngram: int | None = None,
                return_tags: bool = False, top_tags: int = 5) -> list[Caption]:
        """Caption images given as paths, bytes, PIL images, or a mixed list; one Caption per input, in order.

        Decoding defaults (beam size, lengths, length penalty, the no-repeat n-gram rule) come from the checkpoint.
        `names` (one per image) replaces the default source names ("<bytes #i>" for bytes) in `Caption.source` and
        in errors. `return_tags=True` fills `Caption.tags` with the `top_tags` ImageNet classes the encoder's own
        classifier sees, from the same forward pass: one more 1x1 convolution per grid cell and a pooled classifier,
        a few percent of the time of captioning.

        Raises:
            ImageLoadError: an image cannot be read and `on_error="raise"`.
            TagError: (a ValueError) tags asked for and the encoder has no ImageNet classifier, or timm's label
                files are not installed.
        """
        items = as_items(images)
        if names is not None and len(names) != len(items):
            raise ValueError(f"got {len(names)} names for {len(items)} images")
        num_workers = count_argument("num_workers", num_workers, 0)  # checked before one image overrides it
        if len(items) == 1:
            num_workers = 0  # nothing to overlap with: a thread hand-off would only add latency
        return list(self.caption_iter(items, beam_size=beam_size, n_best=n_best, batch_size=batch_size,
                                         max_length=max_length, min_length=min_length,
                                         length_penalty=length_penalty, return_attention=return_attention,
                                         return_gates=return_gates, on_error=on_error, num_workers=num_workers,
                                         names=names, no_repeat_ngram=no_repeat_ngram,
                                         return_tags=return_tags, top_tags=top_tags))

    def caption_iter(self, images: Iterable[ImageInput], *, beam_size: int | None = None, n_best: int = 1,
                     batch_size: int = 64, max_length: int | None = None, min_length: int | None = None,
                     length_penalty: float | None = None, return_attention: bool = False,
                     return_gates: bool = False, on_error: Literal["raise", "skip"] = "raise",
                     num_workers: int = 2, names: Iterable[str] | None = None,
                     no_repeat_ngram: int | None = None, return_tags: bool = False,
                     top_tags: int = 5) -> Iterator[Caption]:
        """Like `caption`, but lazily: yields Captions in input order as each batch finishes.

        `images` is consumed lazily too, and only about two batches are in memory at a time, so this scales to
        any number of images. `num_workers` threads decode the next batch while the network runs the current
        one; 0 decodes in the calling thread.

        If `images` (or `names`) raises, every image received before the error is captioned and yielded first,
        then the error is raised again.

        Raises:
            ValueError: an argument is out of range (named in the message), at the call, before any work. Counts
                are any integers (`numbers.Integral`, numpy's too) but bools; `length_penalty` is in [0, 2], the
                range of `DecodeConfig.length_penalty`.
            TagError: (a ValueError) as in `caption`, also at the call.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        batch_size = count_argument("batch_size", batch_size, 1)
        num_workers = count_argument("num_workers", num_workers, 0)
        settings, n_best = check_decode(self.model.decode_cfg, n_best, beam_size=beam_size, max_length=max_length,
                                        min_length=min_length, length_penalty=length_penalty,
                                        no_repeat_ngram=no_repeat_ngram)
        if return_tags:
            top_tags = count_argument("top_tags", top_tags, 1)
            self.tag_head()  # no classifier or no label files: fail here, before any image is read
        search = {"settings": settings, "n_best": n_best, "return_attention": return_attention,
                  "return_gates": return_gates}  # `decode`'s arguments
        tags = top_tags if return_tags else 0
        return self._stream(images, names, batch_size, num_workers, on_error, search, tags)

    def _stream(self, images: Iterable[ImageInput], names: Iterable[str] | None, batch_size: int,
                num_workers: int, on_error: str, search: dict, tags: int) -> Iterator[Caption]:
        """`tags`: how many ImageNet tags per image, 0 for none. An error of the input is raised once what came
        before it is captioned (`api_inputs.until_error`)."""
        labels = named(images, names) if names is not None else zip(images, itertools.repeat(None))
        failure: list[Exception] = []
        indexed = until_error(((i, item, name) for i, (item, name) in enumerate(labels)), failure)
        loaded = prepared_batches(indexed, self._safe_preprocess, batch_size, num_workers)
        try:
            for batch in loaded:
                yield from self._caption_batch(batch, on_error, search, tags)
        finally:  # also when the consumer stops early: the decoding threads end with it
            loaded.close()
        if failure:
            raise failure[0]

    def _safe_preprocess(self, indexed: tuple[int, ImageInput, str | None]
                         ) -> tuple[str, torch.Tensor | ImageLoadError]:
        """Decode and resize one image to (3, H, W) uint8, in a decoding worker; the encoder normalises the
        batch's pixels chunk by chunk, or inside its graph (`FastEncoder`)."""
        index, item, name = indexed
        source = name or describe(item, index)
        prep = self.encoder.preprocess
        try:
            return source, prep.to_uint8(open_image(item, prep.size, source))
        except ImageLoadError as exc:
            return source, exc
        except Exception as exc:  # noqa: BLE001 - one image's failure must not end the others' captions
            # What the loader did not foresee (an allocation the resize could not make, ...): this image's error,
            # not the batch's. It ended the whole job, and --resume met it again at every try.
            return source, ImageLoadError(source, f"could not be prepared ({type(exc).__name__}: {exc})")

    def _caption_batch(self, loaded: list[tuple[str, torch.Tensor | ImageLoadError]], on_error: str,
                       search: dict, tags: int = 0) -> list[Caption]:
        good = [(i, x) for i, (_, x) in enumerate(loaded) if isinstance(x, torch.Tensor)]
        for source, x in loaded:
            if isinstance(x, ImageLoadError) and on_error == "raise":
                raise x
        out: list[Caption] = [Caption(source=s, error=str(x)) if isinstance(x, Exception) else None
                              for s, x in loaded]  # type: ignore[misc]
        if good:
            pixels = torch.stack([x for _, x in good])  # (B, 3, H, W) uint8, normalised by the encoder
            fast = self._fast.for_batch(len(good)) if self._fast is not None else None
            features = self._encode(pixels, fast)  # (B, N, D)
            # The encoder's classifier reads the very features the decoder gets, whatever path made them.
            image_tags = self._tags(features, tags) if tags else [None] * len(good)
            decoder = fast[1] if fast is not None else self.decoder
            hyps = decode(decoder, features, vocab=self.vocab, **search)
            for (i, _), image_hyps, tag_list in zip(good, hyps, image_tags):
                out[i] = self._to_caption(loaded[i][0], image_hyps, tag_list)
        return out

    def _tags(self, features: torch.Tensor, k: int) -> list[list[Tag]]:
        """(B, N, D) grid features -> per image its k most probable ImageNet classes, as Tags."""
        return [[Tag(label, float(p)) for label, p in row] for row in self.tag_head().tags(features, k)]

    def _to_caption(self, source: str, hyps: list[Hypothesis], tags: list[Tag] | None = None) -> Caption:
        best = hyps[0]
        words = self.vocab.decode(best.tokens)
        g = self.encoder.grid_size
        attention = None
        if best.attention is not None:
            attention = best.attention.float().view(-1, g, g).cpu().numpy()
        gates = {k: v.float().cpu().numpy() for k, v in best.gates.items()} if best.gates is not None else None
        alternatives = [Alternative(" ".join(self.vocab.decode(h.tokens)), h.score, h.logprob) for h in hyps]
        return Caption(source=source, text=" ".join(words), tokens=words, score=best.score, logprob=best.logprob,
                       alternatives=alternatives, attention=attention, gates=gates, tags=tags)
