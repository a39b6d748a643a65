"""The opt-in int8 encoder: ONNX Runtime static quantisation from calibration ranges kept as JSON.

Why: on the AVX-512 (VNNI) test machine the int8 trunk ran 2.2x faster than the fp32 one and the batch pipeline
1.34x, and on 1,000 Flickr8k dev images the shipped model's scores barely moved (CIDEr-D 0.5525 against 0.5584,
BLEU-4 0.2197 against 0.2211) although a third of the captions changed. So it is offered, never the default
(which keeps the reference captions).

What is kept: the activation ranges, not a quantised model. `calibrate` runs the fp32 ONNX trunk (the very graph
`FastEncoder` runs, from `captioner.runtime.fast.export_onnx`) on a few hundred training images once and records every
activation's minimum and maximum (ONNX Runtime's MinMax calibration). They go to a JSON file beside the checkpoint
(`calibration_path`): our header (format, the encoder it was measured for, the image count) around ONNX Runtime's
own calibration-cache layout, which needs onnxruntime >= 1.32. At load time `quantize` turns the same fp32 graph
into a QDQ int8 graph from those ranges (weights per output channel, activations unsigned 8-bit) in about a
second. On CPUs without VNNI the weights get 7 bits (ONNX Runtime's advice against saturation), so captions can
differ between such CPUs and others.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from captioner.models.checkpoint import atomic_write_bytes

FORMAT = 1


class CalibrationError(ValueError):
    """An int8 calibration file is missing, damaged, or was measured for another encoder."""


def calibration_path(checkpoint: str | os.PathLike) -> Path:
    """Where a checkpoint's int8 calibration lives: `model.safetensors` -> `model.int8.json`."""
    return Path(checkpoint).with_suffix(".int8.json")


def _settings(reduce_range: bool) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    return {"quant_format": QuantFormat.QDQ, "per_channel": True, "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8, "reduce_range": reduce_range,
            "calibrate_method": CalibrationMethod.MinMax}  # only each tensor's min and max are kept per batch


def _prepared(model: bytes):
    """`model` after ONNX Runtime's basic graph optimisations (constant folding, Conv + Clip and similar fusions),
    the form its quantiser expects: quantised without them, the int8 encoder ran only 1.1-1.3x faster than fp32;
    with them, 2.2x. Calibration and quantisation both start from it, so the tensor names match. Marked as
    pre-processed, which is what the quantiser checks before advising it through the root logger."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization.quant_utils import add_pre_process_metadata

    with tempfile.TemporaryDirectory(prefix="captioner-int8-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        options.log_severity_level = 3  # its notes on unused initialisers are not the user's concern
        ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        graph = onnx.load(Path(tmp) / "basic.onnx")
    add_pre_process_metadata(graph)
    return graph


def calibrate(model: bytes, batches: Iterable[np.ndarray], encoder_key: str, out: str | os.PathLike) -> int:
    """Measure the activation ranges of the fp32 ONNX `model` on `batches` of preprocessed images
    (b, 3, H, W) and write them to `out` atomically; returns the number of images seen."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    out = Path(out)
    if not out.parent.is_dir():
        raise CalibrationError(f"{out}: its folder does not exist")
    batches = iter(batches)
    first = next(batches, None)
    if first is None or not len(first):
        raise CalibrationError(f"{out}: no calibration images were given")
    seen = 0

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = itertools.chain([first], batches)

        def get_next(self) -> dict | None:
            nonlocal seen
            x = next(self.batches, None)
            if x is None:
                return None
            seen += len(x)
            return {"images": np.ascontiguousarray(x, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="captioner-int8-") as tmp:
        ranges = Path(tmp) / "ranges.json"
        quantize_static(_prepared(model), Path(tmp) / "int8.onnx", Reader(), calibration_cache_path=ranges,
                        **_settings(reduce_range=False))
        payload = {"format": FORMAT, "encoder": encoder_key, "images": seen, "ranges": json.loads(ranges.read_text())}
    atomic_write_bytes(out, json.dumps(payload, sort_keys=True).encode())  # ONNX Runtime lists tensors in set order
    return seen


def read_calibration(path: str | os.PathLike, encoder_key: str) -> dict:
    """The ranges stored in `path`, after checking that they were measured for `encoder_key`."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"{path}: no int8 calibration file; make one with scripts/calibrate_int8.py")
    try:
        payload = json.loads(path.read_text())
        version, encoder, ranges = payload["format"], payload["encoder"], payload["ranges"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{path}: not an int8 calibration file ({exc})") from exc
    except RecursionError as exc:  # json's C scanner on deeply nested arrays
        raise CalibrationError(f"{path}: not an int8 calibration file (nested too deeply)") from exc
    if version != FORMAT:
        raise CalibrationError(f"{path}: calibration format {version}, this version reads {FORMAT}")
    if encoder != encoder_key:
        raise CalibrationError(f"{path}: measured for encoder {encoder!r}, not {encoder_key!r}; calibrate again")
    if not isinstance(ranges, dict) or not isinstance(ranges.get("data"), dict):
        raise CalibrationError(f"{path}: not an int8 calibration file (no table of ranges)")
    _check_ranges(path, ranges["data"])
    return ranges


def _bounds(value: object) -> np.ndarray | None:
    """A range bound as ONNX Runtime's `TensorData.from_dict` reads it (a number, or {"data", "dtype"} of a
    numpy array), as float64; None for what it is not (its quantiser reports those)."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow to inf is what the caller looks for
            if isinstance(value, dict) and value.get("CLS") == "numpy.array":
                return np.array(value["data"], dtype=np.dtype(value["dtype"])).astype(np.float64)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return np.array(value, dtype=np.float32).astype(np.float64)
    except OverflowError:  # -300 as int8: ONNX Runtime's quantiser ends in the same OverflowError, a traceback
        return np.array(np.nan)
    except (KeyError, TypeError, ValueError):
        pass
    return None


def _check_ranges(path: Path, table: dict) -> None:
    """Refuse ranges no quantiser can use: a bound that is not finite (also after the cast to its dtype: 1e5 in
    float16 is inf, and -300 does not fit int8 at all) or a minimum above its maximum. ONNX Runtime took a NaN
    to an AssertionError traceback ("scale issue"), an infinity to an OpenVINO compile error, and an inverted
    range to an int8 encoder that ran."""
    for name, entry in table.items():
        if not isinstance(entry, dict):
            continue
        low, high = _bounds(entry.get("lowest")), _bounds(entry.get("highest"))
        for bound in (low, high):
            if bound is not None and not np.isfinite(bound).all():
                raise CalibrationError(f"{path}: the range of {str(name)[:80]} is not finite (or does not fit its "
                                       "dtype); calibrate again")
        if low is not None and high is not None and low.shape == high.shape and (low > high).any():
            raise CalibrationError(f"{path}: the minimum of {str(name)[:80]} is above its maximum; calibrate again")


def quantize(model: bytes, ranges: dict, *, reduce_range: bool = False) -> bytes:
    """The QDQ int8 version of the fp32 ONNX `model`, from ranges that `read_calibration` returned.

    `reduce_range` (7-bit weights) is for CPUs without VNNI, where 8-bit products can saturate. Raises
    CalibrationError when the ranges do not fit the graph or cannot be read by this ONNX Runtime.
    """
    from onnxruntime.quantization import quantize_static

    graph = _prepared(model)
    tensors = {name for node in graph.graph.node for name in node.output} | {i.name for i in graph.graph.input}
    missing = sorted(set(ranges["data"]) - tensors)
    if missing:
        raise CalibrationError(f"the calibration names {len(missing)} tensors this encoder graph lacks, e.g. "
                               f"{missing[:2]}; it was measured with another export: calibrate again")
    with tempfile.TemporaryDirectory(prefix="captioner-int8-") as tmp:
        cache, out = Path(tmp) / "ranges.json", Path(tmp) / "int8.onnx"
        cache.write_text(json.dumps(ranges))
        try:
            quantize_static(graph, out, None, calibration_cache_path=cache, **_settings(reduce_range))
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise CalibrationError(f"ONNX Runtime could not quantise from these ranges ({exc})") from exc
        return out.read_bytes()
