"""Metrics: coco-caption scores with and without Java, and the fast CIDEr-D used as a reward."""

import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.evaluation.cider import CiderD
from captioner.evaluation.metrics import score_captions, tokenize_for_eval

REFS = {
    "1": ["A dog runs on the grass.", "a brown dog is running", "The dog plays in a field"],
    "2": ["A man rides a bike.", "a man on a bicycle", "someone cycling down the road"],
    "3": ["Two children play in the snow.", "kids playing in snow", "two kids in the snow"],
}
PREDS = {"1": "a dog runs on the grass", "2": "a man rides a bicycle", "3": "a dog in the snow"}


def test_python_tokenizer_matches_ptb_on_captions():
    captions = {k: v for k, v in REFS.items()}
    assert tokenize_for_eval(captions, use_java=False) == tokenize_for_eval(captions, use_java=True)


def test_scores_without_java_leave_meteor_unavailable():
    scores = score_captions(PREDS, REFS, use_java=False)
    assert scores["METEOR"] is None
    assert 0 < scores["Bleu_1"] <= 1 and scores["CIDEr"] > 0
    perfect = score_captions({k: v[0] for k, v in REFS.items()}, REFS, use_java=False)
    assert perfect["Bleu_1"] > scores["Bleu_1"] and perfect["CIDEr"] > scores["CIDEr"]


def test_meteor_with_java():
    scores = score_captions(PREDS, REFS, metrics=("METEOR",), use_java=True)
    assert 0 < scores["METEOR"] < 1


def test_fast_cider_d_equals_coco_caption():
    gts = tokenize_for_eval(REFS, use_java=False)
    res = tokenize_for_eval({k: [v] for k, v in PREDS.items()}, use_java=False)
    expected_mean, expected = Cider().compute_score(gts, res)
    keys = sorted(gts)
    scorer = CiderD([[ref.split() for ref in gts[k]] for k in keys])
    ours = [scorer.score(i, res[k][0].split()) for i, k in enumerate(keys)]
    assert ours == pytest.approx(list(expected), abs=1e-6)


def test_predictions_need_references():
    with pytest.raises(ValueError, match="no references"):
        score_captions({"9": "a cat"}, REFS, use_java=False)


def test_diversity_counts_distinct_words_and_shared_captions():
    from captioner.evaluation.diversity import diversity

    got = diversity({"a": "A dog runs.", "b": "a dog runs", "c": "a cat sits", "d": "two cats sit"})
    # "a dog runs" is said of two images (after the tokenizer's lower-casing and punctuation split).
    assert got == {"distinct_words": 8, "duplicate_share": 0.5, "distinct_captions": 3}
    assert diversity({})["distinct_words"] == 0
