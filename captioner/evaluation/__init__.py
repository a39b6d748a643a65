"""Scoring: decoding a caption set with the one beam search and scoring it with pycocoevalcap (BLEU, METEOR,
ROUGE-L, CIDEr-D), plus the fast CIDEr-D that self-critical training uses as its reward."""
