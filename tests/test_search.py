"""Beam search and sampling (pcmnet.models.search) against brute force and explicit loops.

The "decoder" is a random second-order Markov table: log p(next | the two previous tokens), one
table per batch item, so every hypothesis' score can be computed independently by hand.
"""
import itertools
import math

import pytest
import torch

from pcmnet.models.search import _banned_by_ngram, beam_search, sample

PAD, BOS, EOS = 0, 1, 2
V = 5


def tables(n_items, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(n_items, V, V, V, generator=g, dtype=torch.float64) * scale, -1)


def make_step(table, K):
    """step(tokens [B*K, t]) -> log-probs [B*K, V]; row r belongs to item r // K."""
    calls = []

    def step(tokens):
        calls.append(tokens.shape)
        M, t = tokens.shape
        prev1 = tokens[:, -1]
        prev2 = tokens[:, -2] if t >= 2 else torch.full((M,), BOS)
        item = torch.arange(M) // K
        return table[item, prev2, prev1]

    step.calls = calls
    return step


def seq_logp(table, words, max_len):
    """Sum of log-probs of words + the final eos (also when it is forced after max_len words:
    a caption cut at the limit pays for its eos like any other)."""
    assert len(words) <= max_len
    toks = [BOS, BOS] + list(words)
    s = 0.0
    for i, w in enumerate(words):
        s += float(table[toks[i], toks[i + 1], w])
    return s + float(table[toks[-2], toks[-1], EOS])


def has_repeat(words, n):
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def brute_force(table, max_len, length_penalty=0.0, no_repeat=0):
    best, best_words = -math.inf, None
    alphabet = [v for v in range(V) if v != EOS]
    for L in range(max_len + 1):
        for words in itertools.product(alphabet, repeat=L):
            if no_repeat and has_repeat(list(words), no_repeat):
                continue
            s = seq_logp(table, words, max_len)
            if length_penalty:
                s = s / (L + 1) ** length_penalty  # the eos counts in the length
            if s > best:
                best, best_words = s, list(words)
    return best_words, best


def trim(row):
    """Generated tokens up to the first eos; asserts only pads follow it."""
    row = list(row)
    assert EOS in row, row
    k = row.index(EOS)
    assert all(t == PAD for t in row[k + 1:]), row
    return row[:k]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wide_beam_equals_brute_force(seed, length_penalty):
    max_len = 3
    table = tables(1, seed)
    K = 90  # >= 85 = every hypothesis of up to 3 words over 4 non-eos tokens: nothing is pruned
    toks, scores = beam_search(make_step(table[0:1].float(), K), 1, BOS, EOS, PAD, beam_size=K,
                               max_len=max_len, length_penalty=length_penalty)
    words, best = brute_force(table[0], max_len, length_penalty)
    assert trim(toks[0].tolist()) == words
    assert scores[0].item() == pytest.approx(best, abs=1e-4)


def test_length_penalty_changes_the_choice():
    """Some table where raw-sum and mean-log-prob picks differ: both must match brute force."""
    found = False
    for seed in range(30):
        table = tables(1, seed)
        raw, _ = brute_force(table[0], 3, 0.0)
        mean, _ = brute_force(table[0], 3, 1.0)
        if raw != mean:
            found = True
            for lp, want in ((0.0, raw), (1.0, mean)):
                toks, _ = beam_search(make_step(table.float(), 90), 1, BOS, EOS, PAD, beam_size=90,
                                      max_len=3, length_penalty=lp)
                assert trim(toks[0].tolist()) == want
            break
    assert found


def greedy(table, max_len):
    toks = [BOS, BOS]
    words, score = [], 0.0
    for t in range(max_len + 1):
        logp = table[toks[-2], toks[-1]]
        if t == max_len:
            score += float(logp[EOS])  # the forced eos, at its own log-prob
            break
        w = int(logp.argmax())
        score += float(logp[w])
        if w == EOS:
            break
        words.append(w)
        toks.append(w)
    return words, score


@pytest.mark.parametrize("seed", range(5))
def test_beam_one_is_greedy(seed):
    table = tables(4, seed, scale=1.0)
    toks, scores = beam_search(make_step(table.float(), 1), 4, BOS, EOS, PAD, beam_size=1, max_len=6)
    for b in range(4):
        words, score = greedy(table[b], 6)
        assert trim(toks[b].tolist()) == words
        assert scores[b].item() == pytest.approx(score, abs=1e-4)


def test_batched_beams_are_independent():
    table = tables(4, seed=5, scale=1.0)
    K = 3
    toks, scores = beam_search(make_step(table.float(), K), 4, BOS, EOS, PAD, beam_size=K, max_len=7,
                               length_penalty=0.5, no_repeat_ngram=2)
    for b in range(4):
        alone, s = beam_search(make_step(table[b:b + 1].float(), K), 1, BOS, EOS, PAD, beam_size=K,
                               max_len=7, length_penalty=0.5, no_repeat_ngram=2)
        assert trim(toks[b].tolist()) == trim(alone[0].tolist())
        assert scores[b].item() == pytest.approx(s[0].item(), abs=1e-6)


def repeating_table():
    """Wants 'a b a b a b ...' (a=3, b=4) and hates eos until very late."""
    t = torch.full((V, V, V), -8.0, dtype=torch.float64)
    t[:, :, 3] = -6.0
    t[:, 1, 3] = 0.0  # after bos: a
    t[:, 3, 4] = 0.0  # after a: b
    t[:, 4, 3] = 0.0  # after b: a
    t[:, :, EOS] = -5.0
    return torch.log_softmax(t, -1)


def test_without_ban_the_table_repeats():
    table = repeating_table()
    # greedy: every step prefers the next word to eos (a wider beam would keep the immediate eos,
    # which costs the same log p(eos) as the eos forced after the last word, and wins by a hair)
    toks, _ = beam_search(make_step(table[None].float(), 1), 1, BOS, EOS, PAD, beam_size=1, max_len=6)
    assert trim(toks[0].tolist()) == [3, 4, 3, 4, 3, 4]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram(n):
    table = repeating_table()
    max_len = 4
    for K in (1, 3):
        toks, _ = beam_search(make_step(table[None].float(), K), 1, BOS, EOS, PAD, beam_size=K,
                              max_len=max_len, no_repeat_ngram=n)
        words = trim(toks[0].tolist())
        assert not has_repeat(words, n), (K, words)
    # with every hypothesis kept, the result is the best one among the sequences without repeats
    toks, score = beam_search(make_step(table[None].float(), 90), 1, BOS, EOS, PAD, beam_size=90,
                              max_len=max_len, no_repeat_ngram=n)
    words, best = brute_force(table, max_len, no_repeat=n)
    assert trim(toks[0].tolist()) == words and score.item() == pytest.approx(best, abs=1e-4)


def test_banned_by_ngram_by_hand():
    assert _banned_by_ngram([[3, 4, 3]], 2) == [[4]]
    assert _banned_by_ngram([[3, 4, 3, 5, 3]], 2) == [[4, 5]]
    assert _banned_by_ngram([[3, 4, 5, 3, 4]], 3) == [[5]]
    assert _banned_by_ngram([[3, 4]], 3) == [[]]
    assert _banned_by_ngram([[3, 4, 4]], 1) == [[3, 4, 4]]
    assert _banned_by_ngram([[3, 4, 3]], 0) == [[]]


def test_finished_beams_keep_their_score():
    # item 0: eos right away is by far the best; item 1: eos is very unlikely until forced
    t = torch.full((2, V, V, V), 0.0, dtype=torch.float64)
    t[0, :, :, EOS] = 6.0
    t[1, :, :, EOS] = -9.0
    t[1, :, :, 3] = 2.0
    table = torch.log_softmax(t, -1)
    K, max_len = 3, 5
    step = make_step(table.float(), K)
    toks, scores = beam_search(step, 2, BOS, EOS, PAD, beam_size=K, max_len=max_len)
    assert toks.shape[1] == max_len + 1 and len(step.calls) == max_len + 1  # item 1 ran to the end
    assert toks[0].tolist() == [EOS] + [PAD] * max_len
    assert scores[0].item() == pytest.approx(float(table[0, BOS, BOS, EOS]), abs=1e-6)
    assert trim(toks[1].tolist()) == [3] * max_len  # cut at max_len, then the forced eos
    assert scores[1].item() == pytest.approx(seq_logp(table[1], [3] * max_len, max_len), abs=1e-4)


def test_stops_early_when_all_finished():
    t = torch.zeros(1, V, V, V, dtype=torch.float64)
    t[..., EOS] = 10.0
    step = make_step(torch.log_softmax(t, -1).float(), 3)
    toks, _ = beam_search(step, 1, BOS, EOS, PAD, beam_size=3, max_len=20)
    assert len(step.calls) <= 3 and toks[0, 0].item() == EOS


@pytest.mark.parametrize("max_len", [1, 2, 5])
def test_max_len_is_respected(max_len):
    # eos never wanted: every beam must end with the forced eos right after max_len words
    t = torch.zeros(3, V, V, V, dtype=torch.float64)
    t[..., EOS] = -50.0
    table = torch.log_softmax(t + torch.randn(t.shape, generator=torch.Generator().manual_seed(1),
                                              dtype=torch.float64), -1)
    toks, _ = beam_search(make_step(table.float(), 2), 3, BOS, EOS, PAD, beam_size=2, max_len=max_len)
    assert toks.shape[1] == max_len + 1
    for row in toks.tolist():
        assert len(trim(row)) == max_len and row[max_len] == EOS


# ------------------------------------------------------------------------------------------------
# sampling


def check_valid(rows, max_len):
    for row in rows:
        words = trim(row)  # exactly one eos, pads after it
        assert len(words) <= max_len and EOS not in words


def test_sample_valid_and_reproducible():
    table = tables(1, seed=3, scale=0.5).float()
    step = make_step(table, 64)  # every row is item 0
    out1 = sample(step, 64, BOS, EOS, PAD, max_len=6, generator=torch.Generator().manual_seed(7))
    out2 = sample(step, 64, BOS, EOS, PAD, max_len=6, generator=torch.Generator().manual_seed(7))
    out3 = sample(step, 64, BOS, EOS, PAD, max_len=6, generator=torch.Generator().manual_seed(8))
    assert out1.shape[1] <= 7
    check_valid(out1.tolist(), 6)
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, out3)
    assert len({tuple(r) for r in out1.tolist()}) > 10  # it samples, it does not decode greedily


def test_sample_hits_max_len_with_forced_eos():
    t = torch.zeros(1, V, V, V)
    t[..., EOS] = -30.0
    step = make_step(torch.log_softmax(t, -1), 8)
    out = sample(step, 8, BOS, EOS, PAD, max_len=4, generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 5) and (out[:, 4] == EOS).all() and (out[:, :4] != EOS).all()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sample_follows_the_distribution(temperature):
    table = tables(1, seed=4, scale=1.0).float()
    n = 20000
    out = sample(make_step(table, n), n, BOS, EOS, PAD, max_len=1, temperature=temperature,
                 generator=torch.Generator().manual_seed(0))
    p = torch.softmax(table[0, BOS, BOS].double() / temperature, -1)
    freq = torch.bincount(out[:, 0], minlength=V).double() / n
    sigma = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-9).all(), (freq, p)
    # after a sampled eos only pads follow; after a word, the forced eos
    check_valid(out.tolist(), 1)


@pytest.mark.parametrize("seed", range(3))
def test_sample_at_zero_temperature_is_greedy(seed):
    table = tables(4, seed, scale=1.0)
    out = sample(make_step(table.float(), 1), 4, BOS, EOS, PAD, max_len=6, temperature=0.0)
    for b in range(4):
        assert trim(out[b].tolist()) == greedy(table[b], 6)[0]
