"""Standard captioning scores through `pycocoevalcap`, so numbers compare with published ones.

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (coco-caption's `Cider` is the CIDEr-D variant), after the PTB tokenizer.
The PTB tokenizer and METEOR both run Java. Without Java, METEOR is reported as unavailable (None) and the
captions are tokenized by a Python re-implementation of what the PTB step does to captions (lowercase, split
off clitics and punctuation, drop the punctuation), so the other scores still run. Training validates with it
too: it saves two JVM starts per epoch and agrees with the Java tokenizer on 4,996 of Flickr8k's 5,000 dev
references (the other four: "d.c.", brackets, a stray "=").
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence

ALL_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")

_CLITIC = re.compile(r"(\w)('s|'re|'ve|'ll|'m|'d|n't)\b")
_SPLIT = re.compile(r"""(\.\.\.|--|[.,!?;:()\[\]{}"`])""")
_DROP = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", "(", ")", "[", "]", "{", "}", '"'}
_CLITICS = {"'s", "'re", "'ve", "'ll", "'m", "'d", "n't"}
# Control characters (C0, DEL, C1) and the Unicode line and paragraph separators. Java's PTB lexer ends a line at
# \r, \v, \f, U+0085, U+2028 and U+2029, str.splitlines also at \x1c-\x1e, and pycocoevalcap replaces only \n.
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _ptb_like(caption: str) -> str:
    """What coco-caption's PTB step does to a caption: split off clitics and punctuation, drop punctuation."""
    text = _SPLIT.sub(r" \1 ", _CLITIC.sub(r"\1 \2", caption.lower()))
    tokens = (t if t in _CLITICS else t.strip("'") for t in text.split())
    return " ".join(t for t in tokens if t and t not in _DROP)


def java_available() -> bool:
    """True when a `java` executable is on PATH (needed by METEOR and the PTB tokenizer)."""
    return shutil.which("java") is not None


def _python_ptb(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    return {k: [_ptb_like(c) for c in caps] for k, caps in captions.items()}


def one_line(caption: str) -> str:
    """`caption` with every line break and other control character made a space.

    Why: coco-caption hands the Java tokenizer one caption a line and reads its output back by position, so a
    reference holding a line break became two lines and every later caption was scored against the wrong image.
    The Python fallback gets the same text, so the two paths still agree."""
    return _BREAKS.sub(" ", caption)


def tokenize_for_eval(captions: Mapping[str, Sequence[str]], use_java: bool | None = None) -> dict[str, list[str]]:
    """PTB-tokenize {id: [caption, ...]} as coco-caption does (Java), or with the Python fallback."""
    use_java = java_available() if use_java is None else use_java
    captions = {k: [one_line(c) for c in caps] for k, caps in captions.items()}
    if not use_java:
        return _python_ptb(captions)
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in caps] for k, caps in captions.items()})


def score_captions(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]],
                   metrics: Sequence[str] = ALL_METRICS, use_java: bool | None = None) -> dict[str, float | None]:
    """Score one predicted caption per image against its references.

    Args:
        predictions: {image id: generated caption}.
        references: {image id: [reference captions]}; must cover every prediction.
        metrics: subset of ALL_METRICS to compute (METEOR is the slow one).
        use_java: force the Java tokenizer/METEOR on or off (default: use Java when present).

    Returns:
        {metric: score}; METEOR is None when Java is unavailable.
    """
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"{len(missing)} predictions have no references, e.g. {missing[:3]}")
    unknown = [m for m in metrics if m not in ALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {ALL_METRICS}")
    use_java = java_available() if use_java is None else use_java
    keys = sorted(predictions)
    gts = tokenize_for_eval({k: list(references[k]) for k in keys}, use_java)
    res = tokenize_for_eval({k: [predictions[k]] for k in keys}, use_java)
    results: dict[str, float | None] = {}
    if any(m.startswith("Bleu") for m in metrics):
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            if f"Bleu_{n + 1}" in metrics:
                results[f"Bleu_{n + 1}"] = float(bleu[n])
    if "METEOR" in metrics:
        if use_java:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            try:
                results["METEOR"] = float(meteor.compute_score(gts, res)[0])
            finally:  # pycocoevalcap's Meteor has no close(); stop its JVM now rather than at garbage collection
                meteor.meteor_p.stdin.close()
                meteor.meteor_p.kill()
                meteor.meteor_p.wait()
        else:
            results["METEOR"] = None
    if "ROUGE_L" in metrics:
        from pycocoevalcap.rouge.rouge import Rouge

        results["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    if "CIDEr" in metrics:
        from pycocoevalcap.cider.cider import Cider

        results["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return results
