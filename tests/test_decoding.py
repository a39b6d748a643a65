"""Beam search: agreement with greedy and with image-by-image search, ordering, lengths, edge cases."""

import math

import pytest
import torch

from captioner.decoding import beam_search
from captioner.models.decoder import StepOutput, build_decoder, lstm_cell_with_gates
from captioner.models.vocab import Vocabulary

START, END = Vocabulary.start_id, Vocabulary.end_id


class TableDecoder:
    """A Markov chain over tokens: the next-token distribution depends only on the previous token."""

    def __init__(self, probs: dict[int, dict[int, float]], vocab_size: int):
        table = torch.full((vocab_size, vocab_size), 1e-9)
        for prev, row in probs.items():
            for nxt, p in row.items():
                table[prev, nxt] = p
        self.logits = table.log()

    def init(self, features):
        return {}, {"h": features.new_zeros(features.size(0), 1)}

    def step(self, tokens, memory, state, return_gates=False):
        return StepOutput(self.logits[tokens], state)


def random_decoder(tiny_cfg, vocab, seed=0, kind="attention"):
    torch.manual_seed(seed)
    cfg = type(tiny_cfg)(**{**tiny_cfg.__dict__, "decoder": kind})
    return build_decoder(cfg, len(vocab), 32).eval()


def greedy_reference(decoder, features, max_length):
    """Plain greedy decoding written independently of beam_search."""
    memory, state = decoder.init(features)
    tokens = torch.full((features.size(0),), START)
    out_tokens, done = [[] for _ in range(features.size(0))], [False] * features.size(0)
    for _ in range(max_length):
        out = decoder.step(tokens, memory, state)
        state = out.state
        tokens = out.logits.argmax(1)
        for i, w in enumerate(tokens.tolist()):
            if not done[i]:
                if w == END:
                    done[i] = True
                else:
                    out_tokens[i].append(w)
    return out_tokens


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_beam_size_one_is_greedy(tiny_cfg, vocab, kind):
    decoder = random_decoder(tiny_cfg, vocab, kind=kind)
    features = torch.randn(5, 9, 32)
    with torch.no_grad():
        expected = greedy_reference(decoder, features, max_length=12)
    got = beam_search(decoder, features, start_id=START, end_id=END, beam_size=1, max_length=12,
                      min_length=0)
    assert [h[0].tokens for h in got] == expected


def _rank(logprob, length, length_penalty):
    return logprob / length**length_penalty if length_penalty else logprob


def beam_reference(decoder, features, beam_size, max_length, length_penalty):
    """Beam search over one image written independently of `beam_search`: a list of hypotheses, one decoder
    step per hypothesis, finished ones carried over unchanged."""
    memory, state = decoder.init(features)  # one image
    beams = [([], 0.0, state, False)]  # tokens, logprob, state, finished
    for _ in range(max_length):
        candidates = []
        for tokens, logprob, state, finished in beams:
            if finished:
                candidates.append((tokens, logprob, state, True))
                continue
            out = decoder.step(torch.tensor([tokens[-1] if tokens else START]), memory, state)
            for word, lp in enumerate(torch.log_softmax(out.logits[0], 0).tolist()):
                candidates.append((tokens + [word], logprob + lp, out.state, word == END))
        beams = sorted(candidates, key=lambda b: _rank(b[1], len(b[0]), length_penalty), reverse=True)[:beam_size]
        if all(b[3] for b in beams):
            break
    return [([w for w in b[0] if w != END], _rank(b[1], len(b[0]), length_penalty)) for b in beams]


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
@pytest.mark.parametrize("beam_size", [1, 3])
def test_beam_search_matches_a_plain_reference(tiny_cfg, vocab, kind, beam_size):
    """Every image's n-best list and scores as a one-hypothesis-at-a-time search finds them (this covers the
    batched search's shortcuts: one row per image at the first step, finished images leaving the batch)."""
    decoder = random_decoder(tiny_cfg, vocab, seed=5, kind=kind)
    with torch.no_grad():
        decoder.out.weight.mul_(4)  # a confident decoder: fewer near-ties between hypotheses
    features = torch.randn(5, 9, 32)
    got = beam_search(decoder, features, start_id=START, end_id=END, beam_size=beam_size, n_best=beam_size,
                      max_length=8, min_length=0, length_penalty=0.7)
    with torch.no_grad():
        for i in range(5):
            expected = beam_reference(decoder, features[i:i + 1], beam_size, 8, 0.7)
            assert [h.tokens for h in got[i]] == [tokens for tokens, _ in expected]
            assert [h.score for h in got[i]] == pytest.approx([score for _, score in expected], abs=1e-4)


@pytest.mark.parametrize("kind", ["attention", "show_tell"])
def test_batched_equals_one_by_one(tiny_cfg, vocab, kind):
    decoder = random_decoder(tiny_cfg, vocab, seed=1, kind=kind)
    features = torch.randn(6, 9, 32)
    kwargs = dict(start_id=START, end_id=END, beam_size=4, n_best=3, max_length=10, length_penalty=0.7)
    batched = beam_search(decoder, features, **kwargs)
    for i in range(6):
        alone = beam_search(decoder, features[i:i + 1], **kwargs)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[i]], abs=1e-4)


def test_n_best_is_sorted_and_scores_are_consistent(tiny_cfg, vocab):
    decoder = random_decoder(tiny_cfg, vocab, seed=2)
    hyps = beam_search(decoder, torch.randn(3, 9, 32), start_id=START, end_id=END, beam_size=5, n_best=5,
                       max_length=10, length_penalty=1.0)
    for image in hyps:
        assert len(image) == 5
        scores = [h.score for h in image]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in image}) == 5  # distinct sentences
        for h in image:
            length = len(h.tokens) + int(h.finished)
            assert h.score == pytest.approx(h.logprob / length, rel=1e-5)


def test_length_penalty_changes_ranking():
    a, b, c, d = 4, 5, 6, 7
    chain = TableDecoder({START: {a: 0.6, b: 0.4}, a: {END: 1.0}, b: {c: 0.99, a: 0.01},
                          c: {d: 0.99, a: 0.01}, d: {END: 0.99, a: 0.01}}, 8)
    features = torch.zeros(1, 1, 1)
    short = beam_search(chain, features, start_id=START, end_id=END, beam_size=2, max_length=6)[0][0]
    assert short.tokens == [a]  # log .6 > log .4 + 3 log .99
    long = beam_search(chain, features, start_id=START, end_id=END, beam_size=2, max_length=6,
                       length_penalty=1.0)[0][0]
    assert long.tokens == [b, c, d]  # per-token: -0.51/2 < -0.95/4
    assert long.logprob == pytest.approx(math.log(0.4) + 3 * math.log(0.99), abs=1e-4)


def test_no_end_token_returns_best_partial():
    never_ends = TableDecoder({t: {4: 0.7, 5: 0.3} for t in range(8)}, 8)
    hyps = beam_search(never_ends, torch.zeros(2, 1, 1), start_id=START, end_id=END, beam_size=3, n_best=2,
                       max_length=5)
    for image in hyps:
        assert image[0].tokens == [4] * 5 and not image[0].finished
        assert image[0].logprob == pytest.approx(5 * math.log(0.7), abs=1e-4)


def test_min_length_forbids_early_end_and_banned_ids():
    ends_at_once = TableDecoder({t: {END: 0.9, 4: 0.05, 5: 0.05} for t in range(8)}, 8)
    hyp = beam_search(ends_at_once, torch.zeros(1, 1, 1), start_id=START, end_id=END, beam_size=2, max_length=6,
                      min_length=3, banned_ids=[4])[0][0]
    assert hyp.tokens == [5, 5, 5] and hyp.finished


def test_early_exit_when_all_beams_end():
    calls = []
    chain = TableDecoder({START: {4: 0.5, 5: 0.5}, 4: {END: 1.0}, 5: {END: 1.0}}, 8)
    step = chain.step
    chain.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    beam_search(chain, torch.zeros(1, 1, 1), start_id=START, end_id=END, beam_size=2, max_length=50)
    assert len(calls) == 2


def test_attention_and_gates_are_returned_and_match_the_cell(tiny_cfg, vocab):
    decoder = random_decoder(tiny_cfg, vocab, seed=3)
    hyp = beam_search(decoder, torch.randn(2, 9, 32), start_id=START, end_id=END, beam_size=3, max_length=7,
                      return_attention=True, return_gates=True)[0][0]
    steps = len(hyp.tokens) + int(hyp.finished)
    assert hyp.attention.shape == (steps, 9)
    assert torch.allclose(hyp.attention.sum(1), torch.ones(steps), atol=1e-5)
    for name in ("input", "forget", "output", "cell"):
        assert hyp.gates[name].shape == (steps, tiny_cfg.hidden_dim)
    assert ((hyp.gates["forget"] > 0) & (hyp.gates["forget"] < 1)).all()


def test_unfused_cell_equals_lstm_cell():
    cell = torch.nn.LSTMCell(7, 5)
    x, h, c = torch.randn(3, 7), torch.randn(3, 5), torch.randn(3, 5)
    h1, c1 = cell(x, (h, c))
    h2, c2, gates = lstm_cell_with_gates(cell, x, h, c)
    assert torch.allclose(h1, h2, atol=1e-6) and torch.allclose(c1, c2, atol=1e-6)
    assert torch.allclose(gates["cell"], c1, atol=1e-6)
    assert torch.allclose(h1, gates["output"] * torch.tanh(c1), atol=1e-6)


@pytest.mark.parametrize(("n", "expected"), [(0, [4, 5] * 5), (2, [4, 5, 4]), (3, [4, 5, 4, 5]), (4, [4, 5, 4, 5, 4])])
def test_no_repeat_ngram_cuts_a_loop_where_the_ngram_would_repeat(n, expected):
    # 4 -> 5 -> 4 -> 5 ... with a small chance of <end> after each: greedy loops to max_length unless the
    # rule forbids the word that would repeat an n-gram, and then <end> is the likeliest word left.
    decoder = TableDecoder({START: {4: 1.0}, 4: {5: 0.9, END: 0.1}, 5: {4: 0.9, END: 0.1}}, vocab_size=8)
    [[best]] = beam_search(decoder, torch.zeros(1, 2), start_id=START, end_id=END, beam_size=1, max_length=10,
                           no_repeat_ngram=n)
    assert best.tokens == expected and best.finished == (n > 0)


def test_no_repeat_ngram_holds_for_every_hypothesis_of_a_real_decoder(tiny_cfg, vocab):
    decoder = random_decoder(tiny_cfg, vocab, seed=3)
    features = torch.randn(6, 5, 32)

    def repeats(tokens, n=3):
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        return len(grams) != len(set(grams))

    free = beam_search(decoder, features, start_id=START, end_id=END, beam_size=3, n_best=3, max_length=16)
    ruled = beam_search(decoder, features, start_id=START, end_id=END, beam_size=3, n_best=3, max_length=16,
                        no_repeat_ngram=3)
    assert any(repeats(h.tokens) for image in free for h in image)  # an untrained decoder loops
    assert not any(repeats(h.tokens) for image in ruled for h in image)


class MemoryDecoder:
    """Per-image memory (`memory_per_image`): image b repeats word `features[b, 0]` `features[b, 1]` times, then
    ends. Its captions show whether each row still reads its own image's memory after others leave the batch."""

    memory_per_image = True

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def init(self, features):
        memory = {"word": features[:, 0].long(), "length": features[:, 1].clone(), "grid": features.repeat(1, 4)}
        return memory, {"t": features.new_zeros(features.size(0), 1)}

    def step(self, tokens, memory, state, return_gates=False):
        rows = tokens.size(0)
        k = rows // memory["word"].size(0)  # 1 at the first step, then the beam size
        word, length = memory["word"].repeat_interleave(k), memory["length"].repeat_interleave(k)
        t = state["t"].view(-1)
        logits = torch.full((rows, self.vocab_size), -10.0)
        logits[torch.arange(rows), torch.where(t < length, word, END)] = 0.0
        logits[:, -1] = -5.0  # a second choice, so that the beams differ
        return StepOutput(logits, {"t": state["t"] + 1})


def test_rows_read_their_own_image_memory_after_finished_images_leave_the_batch():
    lengths = [1, 8, 2, 7, 3, 6, 1, 5, 2, 8, 4, 1]  # early finishers everywhere: holes filled from the tail
    features = torch.tensor([[5.0 + i % 4, n] for i, n in enumerate(lengths)])
    decoder = MemoryDecoder(vocab_size=12)
    got = beam_search(decoder, features, start_id=START, end_id=END, beam_size=3, max_length=10)
    assert [h[0].tokens for h in got] == [[5 + i % 4] * n for i, n in enumerate(lengths)]
    assert all(h[0].finished for h in got)
    for i in range(len(lengths)):
        alone = beam_search(decoder, features[i:i + 1], start_id=START, end_id=END, beam_size=3, max_length=10)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in got[i]]


class EndedRowsDecoder(MemoryDecoder):
    """`MemoryDecoder` that may skip ended rows (`skips_ended_rows`): it records each mask it is handed and poisons
    the outputs of those rows, which the search must never read."""

    skips_ended_rows = True

    def __init__(self, vocab_size: int):
        super().__init__(vocab_size)
        self.handed: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.poison = torch.Generator().manual_seed(0)

    def step(self, tokens, memory, state, return_gates=False, ended=None):
        out = super().step(tokens, memory, state, return_gates)
        if ended is not None:
            self.handed.append((tokens.clone(), ended.clone()))
            out.logits[ended] = 50.0 * torch.randn(int(ended.sum()), self.vocab_size,
                                                   generator=self.poison)  # loud, finite
            out.state["t"][ended] = -100.0
        return out


def test_ended_rows_are_named_to_a_decoder_that_skips_them_and_their_outputs_are_never_read():
    lengths = [1, 8, 2, 7, 3, 6, 1, 5, 2, 8, 4, 1]
    features = torch.tensor([[5.0 + i % 4, n] for i, n in enumerate(lengths)])
    kw = {"start_id": START, "end_id": END, "beam_size": 3, "n_best": 3, "max_length": 10}
    plain = beam_search(MemoryDecoder(vocab_size=12), features, **kw)
    skipping = EndedRowsDecoder(vocab_size=12)
    got = beam_search(skipping, features, **kw)
    assert [[(h.tokens, h.score) for h in image] for image in got] == \
        [[(h.tokens, h.score) for h in image] for image in plain]
    assert skipping.handed and any(bool(ended.any()) for _, ended in skipping.handed)
    for tokens, ended in skipping.handed:  # the first step (one row per image) is never handed a mask
        assert tokens.numel() % 3 == 0
        assert torch.equal(ended, tokens == END)  # an ended row's last word is <end>, and only an ended row's


def test_decode_runs_the_search_with_every_setting_of_its_decode_config(tiny_cfg, vocab):
    """`decode` is how the API, evaluation and SCST search: each DecodeConfig field must reach the search (a field
    copied by hand into one caller and not another is what it replaced)."""
    import dataclasses

    from captioner.config import DecodeConfig
    from captioner.decoding import decode

    decoder = random_decoder(tiny_cfg, vocab, seed=3)
    features = torch.randn(4, 9, 32)
    settings = DecodeConfig(beam_size=4, max_length=7, min_length=3, length_penalty=0.9, no_repeat_ngram=2)
    got = decode(decoder, features, settings, vocab, n_best=3, return_attention=True)
    want = beam_search(decoder, features, start_id=START, end_id=END, banned_ids=vocab.banned_ids, n_best=3,
                       return_attention=True, **dataclasses.asdict(settings))
    assert [[(h.tokens, h.score) for h in image] for image in got] == [[(h.tokens, h.score) for h in image]
                                                                       for image in want]
    assert all(h.attention is not None and len(image) == 3 for image in got for h in image)
    for field in dataclasses.fields(DecodeConfig):  # each setting changed alone reaches the search too
        other = dataclasses.replace(settings, **{field.name: {"beam_size": 1, "max_length": 4, "min_length": 0,
                                                              "length_penalty": 0.0, "no_repeat_ngram": 0}
                                                             [field.name]})
        want = beam_search(decoder, features, start_id=START, end_id=END, banned_ids=vocab.banned_ids,
                           **dataclasses.asdict(other))
        assert [[h.tokens for h in image] for image in decode(decoder, features, other, vocab)] == \
            [[h.tokens for h in image] for image in want]
