"""Ranking and metrics under both protocols (dimkit.evaluate)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from dimkit import evaluate as ev
from dimkit.errors import ConfigError, DataError

NAN = float("nan")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_ties_count_against_the_model_by_default_and_for_it_with_the_released_rule():
    s = torch.tensor([[0.5, 0.5, 0.1, 0.9],   # gold col 0: one tie (col 1), one better (col 3)
                      [0.2, 0.2, 0.2, 0.2],   # all tied
                      [0.9, 0.1, 0.2, 0.3]])  # clear winner
    gold = torch.tensor([0, 2, 0])
    assert ev.gold_rank(s, gold).tolist() == [3, 4, 1]
    assert ev.gold_rank(s, gold, "strict").tolist() == [2, 1, 1]


def test_nan_scores():
    s = torch.tensor([[NAN, 0.1, 0.2],    # NaN gold: last by default, first under the released rule
                      [0.3, NAN, 0.1],    # NaN elsewhere never beats the gold
                      [NAN, NAN, NAN]])
    gold = torch.tensor([0, 0, 1])
    assert ev.gold_rank(s, gold).tolist() == [3, 1, 3]
    assert ev.gold_rank(s, gold, "strict").tolist() == [1, 1, 1]
    with pytest.raises(ConfigError):
        ev.gold_rank(s, gold, "optimistic")


def test_padding_is_never_counted():
    s = torch.tensor([[0.1, 0.5, 0.9, 0.9]])
    valid = torch.tensor([[True, True, False, False]])
    assert ev.gold_rank(s, torch.tensor([0]), valid=valid).tolist() == [2]
    s_nan = torch.tensor([[NAN, 0.5, 0.9, 0.9]])
    assert ev.gold_rank(s_nan, torch.tensor([0]), valid=valid).tolist() == [2]  # last of 2 real


def test_metrics_on_toy_ranks():
    m = ev.metrics_from_ranks([1, 2, 4, 10, 30], ev.KB_KS)
    assert m["H@1"] == pytest.approx(0.2)
    assert m["H@3"] == pytest.approx(0.4)
    assert m["H@5"] == pytest.approx(0.6)
    assert m["H@10"] == pytest.approx(0.8)
    assert m["H@20"] == pytest.approx(0.8)
    assert m["MRR"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 10 + 1 / 30) / 5)
    assert m["MR"] == pytest.approx(47 / 5)
    assert m["n"] == 5
    empty = ev.metrics_from_ranks([], ev.DIM_KS)
    assert empty["H@1"] is None and empty["n"] == 0


def test_candidate_matrix_puts_gold_first_once_and_checks_ids():
    cands = pd.DataFrame({"mention_id": ["a", "b"], "qids": [["Q2", "Q1", "Q3"], ["Q3"]]})
    index = {"Q1": 0, "Q2": 1, "Q3": 2, "Q4": 3}
    m = ev.candidate_matrix(cands, ["a", "b"], [0, 3], index)
    assert m.tolist() == [[0, 1, 2], [3, 2, -1]]
    assert ev.candidate_matrix(cands, ["a"], [0], index, limit=1).tolist() == [[0, 1]]
    with pytest.raises(DataError, match="'c'"):
        ev.candidate_matrix(cands, ["c"], [0], index)
    bad = pd.DataFrame({"mention_id": ["a"], "qids": [["Q9"]]})
    with pytest.raises(DataError, match="Q9"):
        ev.candidate_matrix(bad, ["a"], [0], index)


def _brute_force_rank(q, e, gold, others):
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    g = cos(q, e[gold])
    return 1 + sum(cos(q, e[o]) >= g for o in others if o != gold)


def test_dim_and_kb_ranks_match_brute_force_cosine():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(40, 8)).astype(np.float32) * 5
    q = rng.normal(size=(12, 8)).astype(np.float32)
    gold = rng.integers(0, 40, size=12)
    cand = np.full((12, 11), -1)
    lists = []
    for i in range(12):
        others = rng.choice(40, size=rng.integers(3, 11), replace=False)
        row = [gold[i]] + [o for o in others if o != gold[i]]
        cand[i, :len(row)] = row
        lists.append(row)
    d = ev.dim_ranks(torch.tensor(q), torch.tensor(e), cand, chunk=5).tolist()
    assert d == [_brute_force_rank(q[i], e, gold[i], lists[i]) for i in range(12)]
    k, top = ev.kb_ranks(torch.tensor(q), torch.tensor(e), gold, chunk=5, topk=3)
    assert k.tolist() == [_brute_force_rank(q[i], e, gold[i], range(40)) for i in range(12)]
    best = [int(np.argmax(e @ q[i] / np.linalg.norm(e, axis=1))) for i in range(12)]
    assert top[:, 0].tolist() == best
    # cosine, not dot product: scaling an entity changes nothing
    e2 = e.copy()
    e2[gold[0]] *= 100
    assert ev.kb_ranks(torch.tensor(q), torch.tensor(e2), gold)[0].tolist() == k.tolist()


def test_duplicate_entity_vectors_tie_and_nan_queries_rank_last():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # entities 0 and 1 are identical
    q = torch.tensor([[1.0, 0.1], [NAN, 0.0]])
    r, _ = ev.kb_ranks(q, e, np.array([0, 2]))
    assert r.tolist() == [2, 3]
    r_strict, _ = ev.kb_ranks(q, e, np.array([0, 2]), rule="strict")
    assert r_strict.tolist() == [1, 1]


def test_evaluate_queries_reports_both_protocols():
    rng = np.random.default_rng(1)
    e = torch.tensor(rng.normal(size=(30, 6)), dtype=torch.float32)
    gold = np.arange(10)
    q = e[:10] + 0.01  # near-perfect queries
    cand = np.array([[g] + [(g + j) % 30 for j in range(1, 6)] for g in gold])
    metrics, ranks = ev.evaluate_queries(q, e, gold, cand)
    assert set(metrics) == {"dim", "kb"}
    assert set(metrics["dim"]) == {"H@1", "H@5", "H@10", "H@20", "MRR", "MR", "n"}
    assert set(metrics["kb"]) == {"H@1", "H@3", "H@5", "H@10", "H@20", "MRR", "MR", "n"}
    assert metrics["dim"]["H@1"] == 1.0 and metrics["kb"]["H@1"] == 1.0 and metrics["kb"]["MR"] == 1.0
    assert ranks["kb"].shape == (10,)
    with pytest.raises(ConfigError):
        ev.evaluate_queries(q, e, gold, None, protocols=("dim",))
    m_kb, _ = ev.evaluate_queries(q, e, gold, None, protocols=("kb",))
    assert set(m_kb) == {"kb"} and math.isclose(m_kb["kb"]["MRR"], 1.0)


def test_one_scoring_pass_gives_each_rule_what_its_own_pass_gives():
    # quantised vectors make ties common, so the two rules differ
    rng = np.random.default_rng(2)
    e = torch.tensor(rng.integers(0, 2, size=(50, 4)), dtype=torch.float32)
    q = torch.tensor(rng.integers(0, 2, size=(20, 4)), dtype=torch.float32)
    gold = rng.integers(0, 50, size=20)
    cand = np.array([[g] + [int(x) for x in rng.choice(50, 7) if x != g][:5] for g in gold])
    metrics, ranks, top = ev.evaluate_rules(q, e, gold, cand, ev.RULES, topk=5)
    for rule in ev.RULES:
        m, r = ev.evaluate_queries(q, e, gold, cand, rule)
        assert metrics[rule] == m
        for p in ev.PROTOCOLS:
            np.testing.assert_array_equal(ranks[rule][p], r[p])
    assert (ranks["strict"]["kb"] < ranks["pessimistic"]["kb"]).any(), "no ties: the test would not tell"
    assert top.tolist() == ev.kb_ranks(q, e, gold, topk=5)[1].tolist()
    by_rule, _ = ev.kb_ranks(q, e, gold, ev.RULES)
    assert set(by_rule) == set(ev.RULES)
    assert ev.evaluate_rules(q, e, gold, None, ev.RULES, ("kb",))[2] is None
