"""The released TF-IDF negatives: stop lists, tables and the released random stream (dimkit.negatives)."""
from __future__ import annotations

import json
import math
import random
import string

import numpy as np
import pytest

from dimkit import negatives
from dimkit.errors import ConfigError

# a toy KB: shared tokens, a lonely entity (its tokens occur nowhere else) and one with no
# weighted token at all (every token of it is in every text)
TEXTS = ["red apple fruit sweet", "red cherry fruit", "green apple sour", "blue whale sea big",
         "grey whale sea", "violet orchid", "red apple fruit sweet cherry", "sea fruit apple"]


def _expected(s, gold: int) -> np.ndarray:
    """Exact distribution of one accepted negative of ``gold``, from the sampler's tables."""
    n = s.num_entities
    p = np.full(n, 1.0 / n)
    ids, w = s._runs(s._ent_tok, s._ent_cum, s._ent_start, gold)
    if len(ids):
        hard = np.zeros(n)
        for t, wt in zip(ids.tolist(), w.tolist()):
            ents, cnt = s._runs(s._tok_ent, s._tok_cum, s._tok_start, t)
            np.add.at(hard, ents, wt / w.sum() * cnt / cnt.sum())
        p = s.hard_prob * hard + (1 - s.hard_prob) / n
    p[gold] = 0.0
    return p / p.sum()


def _neg_sample_online(neg_id, neg_iid, tfidf_neg, rnd, max_sample_num=1, threshold=0.95):
    """The released nel_model/dataset.py::neg_sample_online on plain lists, with a Random instance
    instead of the module-level functions (negid2qid left out: it maps indices to qids)."""
    N = len(tfidf_neg)
    cands = set()
    while len(cands) < max_sample_num:
        rand = rnd.random()
        if not len(tfidf_neg[neg_id]) or rand > threshold:
            cand = rnd.randint(0, N - 1)
        else:
            rand_word = rnd.choice(tfidf_neg[neg_id])
            cand = rnd.choice(neg_iid[rand_word])
        if cand != neg_id:
            cands.add(cand)
    return list(cands)


# ---------------------------------------------------------------- stop lists


def test_stop_lists_differ_exactly_by_the_extra_punctuation():
    released_marks = {",", ".", "!", ":", "'", '"', ";", "/", "\\"}
    labels = set(negatives.ATTRIBUTE_LABELS)
    assert negatives.RELEASED_STOP_TOKENS == released_marks | labels | {""}
    assert negatives.DIMKIT_STOP_TOKENS == set(string.punctuation) | labels
    assert negatives.DIMKIT_STOP_TOKENS - negatives.RELEASED_STOP_TOKENS == set(string.punctuation) - released_marks
    assert negatives.RELEASED_STOP_TOKENS - negatives.DIMKIT_STOP_TOKENS == {""}
    assert negatives.STOP_TOKENS is negatives.DIMKIT_STOP_TOKENS
    assert negatives.stop_tokens("released") is negatives.RELEASED_STOP_TOKENS
    assert negatives.stop_tokens(["x"]) == {"x"}
    with pytest.raises(ConfigError):
        negatives.stop_tokens("nltk")


def test_released_stop_list_keeps_brackets_and_hyphens():
    toks = negatives.tokenize("Ada (poet) - writer & mathematician? Occupation: count; Alma mater")
    released = [t for t in toks if t not in negatives.RELEASED_STOP_TOKENS]
    dimkit = [t for t in toks if t not in negatives.DIMKIT_STOP_TOKENS]
    assert released == ["Ada", "(", "poet", ")", "-", "writer", "&", "mathematician", "?", "count"]
    assert dimkit == ["Ada", "poet", "writer", "mathematician", "count"]
    texts = ["Ada (poet)", "Bob - painter", "Cy the poet"]
    for cls in (negatives.TfidfNegativeSampler, negatives.ReleasedTfidfSampler):
        assert {"(", ")", "-"} <= set(cls(texts, stop_list="released").vocab)
        assert not {"(", ")", "-"} & set(cls(texts, stop_list="dimkit").vocab)
    assert negatives.TfidfNegativeSampler(texts).stop_tokens is negatives.DIMKIT_STOP_TOKENS  # default
    assert negatives.ReleasedTfidfSampler(texts).stop_tokens is negatives.RELEASED_STOP_TOKENS


# ---------------------------------------------------------------- released tables


def test_released_tables_follow_sample_util():
    s = negatives.ReleasedTfidfSampler(["b a b", "c a", "a d b"])
    # gensim Dictionary: each text's new tokens numbered in sorted order
    assert s.vocab == {"a": 0, "b": 1, "c": 2, "d": 3}
    # "a" is in every text: idf 0, never weighted
    wb0 = 2 * math.log2(3 / 2)
    assert s.token_weights(0) == {"b": int(100 * wb0 / wb0)}
    wb, wd = math.log2(3 / 2), math.log2(3)
    norm = math.hypot(wb, wd)
    assert s.token_weights(2) == {"b": int(wb / norm * 100), "d": int(wd / norm * 100)}
    tfidf_neg, neg_iid = s.repeated_id_lists()
    assert [x.tolist() for x in tfidf_neg] == [[1] * 100, [2] * 100,
                                               [1] * int(wb / norm * 100) + [3] * int(wd / norm * 100)]
    # build_inverted_index: entities in order, repeated by the token's count in them
    assert [x.tolist() for x in neg_iid] == [[0, 1, 2], [0, 0, 2], [1], [2]]


def test_both_samplers_build_the_same_weights_on_the_toy_kb():
    r = negatives.ReleasedTfidfSampler(TEXTS)
    c = negatives.TfidfNegativeSampler(TEXTS, stop_list="released")
    for e in range(len(TEXTS)):
        assert r.token_weights(e) == c.token_weights(e)
    assert r.token_weights(5) and not r.token_weights(5).keys() - {"violet", "orchid"}  # lonely entity


# ---------------------------------------------------------------- the released stream


@pytest.mark.parametrize("k", [1, 2])
def test_released_sampler_replays_neg_sample_online(k):
    s = negatives.ReleasedTfidfSampler(TEXTS, seed=7)
    tfidf_neg, neg_iid = s.repeated_id_lists()
    rnd = random.Random(7)
    gold = np.array([0, 3, 5, 1, 6, 2, 7, 4] * 25)
    want = [_neg_sample_online(int(g), neg_iid, tfidf_neg, rnd, max_sample_num=k) for g in gold]
    got = s.sample(gold, np.random.default_rng(0), k=k)
    assert got.shape == ((len(gold),) if k == 1 else (len(gold), k))
    assert got.reshape(len(gold), k).tolist() == want
    v, internal, gauss = rnd.getstate()  # and it took exactly as many numbers from the stream
    assert s.getstate() == {"version": v, "internal": list(internal), "gauss_next": gauss}


def test_released_sampler_seed_gives_the_same_draws():
    gold = np.arange(len(TEXTS)).repeat(50)
    a = negatives.ReleasedTfidfSampler(TEXTS, seed=114514).sample(gold)
    b = negatives.ReleasedTfidfSampler(TEXTS, seed=114514).sample(gold, np.random.default_rng(99))
    c = negatives.ReleasedTfidfSampler(TEXTS, seed=1).sample(gold)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    s = negatives.ReleasedTfidfSampler(TEXTS, seed=3)
    first = s.sample(gold)
    s.seed(3)  # the released set_seed restarts the stream
    assert np.array_equal(s.sample(gold), first)


def test_state_save_and_restore_continue_the_stream():
    gold = np.arange(len(TEXTS)).repeat(20)
    s = negatives.ReleasedTfidfSampler(TEXTS, seed=11)
    s.sample(gold)
    saved = json.dumps(s.getstate())  # JSON-able, as a checkpoint stores it
    after = [s.sample(gold), s.sample(gold, k=3)]
    t = negatives.ReleasedTfidfSampler(TEXTS, seed=999)
    t.setstate(json.loads(saved))
    assert np.array_equal(t.sample(gold), after[0]) and np.array_equal(t.sample(gold, k=3), after[1])
    u = negatives.ReleasedTfidfSampler(TEXTS, seed=0)
    u.setstate(saved)  # the JSON text works too
    assert np.array_equal(u.sample(gold), after[0])


def test_released_sampler_never_draws_the_gold():
    s = negatives.ReleasedTfidfSampler(TEXTS, seed=5)
    gold = np.arange(len(TEXTS)).repeat(300)
    one = s.sample(gold)
    assert not np.any(one == gold)
    many = s.sample(gold[:200], k=4)
    assert many.shape == (200, 4) and not np.any(many == gold[:200, None])
    assert all(len(set(row)) == 4 for row in many.tolist())  # distinct, as the released set
    # every draw a TF-IDF one, gold whose tokens occur nowhere else: the released loop would spin
    lonely = negatives.ReleasedTfidfSampler(TEXTS, hard_prob=1.0, seed=5)
    assert not np.any(lonely.sample(np.array([5, 5])) == 5)
    # an entity without weighted tokens gets uniform negatives
    flat = negatives.ReleasedTfidfSampler(["x y", "x y", "x y z"], seed=5)
    assert flat.token_weights(0) == {} and not np.any(flat.sample(np.zeros(100, np.int64)) == 0)
    with pytest.raises(ConfigError):
        flat.sample(np.array([0]), k=3)
    with pytest.raises(ConfigError):
        negatives.ReleasedTfidfSampler(["only one"])


def test_released_draws_match_the_cumulative_sampler_distribution():
    released = negatives.ReleasedTfidfSampler(TEXTS, seed=2)
    cumulative = negatives.TfidfNegativeSampler(TEXTS, stop_list="released")
    rng = np.random.default_rng(2)
    # 3 draws itself about 3 times in 4 (a cap of 10 rejected rounds would show), 5 in 19 of 20
    for gold, n in ((0, 20000), (3, 20000), (5, 4000)):
        p = _expected(released, gold)
        assert np.allclose(p, _expected(cumulative, gold))
        for draws in (released.sample(np.full(n, gold)), cumulative.sample(np.full(n, gold), rng)):
            freq = np.bincount(draws, minlength=len(TEXTS)) / n
            sigma = np.sqrt(p * (1 - p) / n)
            assert np.all(np.abs(freq - p) <= 5 * sigma + 1e-3), (gold, freq, p)
    # and the two samplers agree with each other within sampling error
    n = 20000
    a = np.bincount(released.sample(np.zeros(n, np.int64)), minlength=len(TEXTS)) / n
    b = np.bincount(cumulative.sample(np.zeros(n, np.int64), rng), minlength=len(TEXTS)) / n
    assert np.all(np.abs(a - b) <= 5 * np.sqrt(2 * _expected(released, 0) / n) + 1e-3)
