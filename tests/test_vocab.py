from captioner.models.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A Dog's ball, on the GRASS.") == ["a", "dog's", "ball", "on", "the", "grass"]


def test_min_count_and_specials():
    vocab = Vocabulary.build(["a dog", "a cat", "a dog"], min_count=2)
    assert vocab.itos[:4] == list(SPECIALS)
    assert vocab.itos[4:] == ["a", "dog"]  # "cat" seen once is dropped; most frequent first


def test_encode_decode_and_unknown_words():
    vocab = Vocabulary.build(["a dog runs"], min_count=1)
    ids = vocab.encode("A dog flies")
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert ids[3] == vocab.unk_id
    assert vocab.decode(ids) == ["a", "dog", "<unk>"]
    assert len(vocab.encode("a dog runs a dog", max_length=2)) == 4


def test_json_round_trip(tmp_path):
    vocab = Vocabulary.build(["a dog runs", "über café"], min_count=1)
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json") == vocab


def test_captioning_does_not_import_nltk(tmp_path):
    """Only tokenizing needs NLTK, and `import nltk` was a tenth of a cold `captioner caption` (0.27 s)."""
    import subprocess
    import sys

    from PIL import Image

    image = tmp_path / "one.png"
    Image.new("RGB", (64, 48), (200, 40, 40)).save(image)
    code = ("import sys; from captioner import Captioner; Captioner.load().caption(sys.argv[1]); "
            "print('nltk' in sys.modules); from captioner.models.vocab import tokenize; "
            "print(tokenize(\"A dog's ball.\"))")
    out = subprocess.run([sys.executable, "-c", code, str(image)], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["False", "['a', \"dog's\", 'ball']"]
