"""Candidate lists: DIM's search_top100 semantics, exactness of the pruned ranking, the report, CLI."""
from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

from dimkit import candidates, cli, datasets
from dimkit.candidates import process_name, rank_names
from dimkit.errors import ConfigError, DataError

NAMES = ["Barack Obama", "Michelle Obama", "Obama (surname)", "Barack Obama Sr.", "Michael Jordan",
         "Jordan River", "Jordan", "Michael B. Jordan", "Paris", "Paris Hilton", "Paris, Texas",
         "Paris Saint-Germain F.C.", "New York City", "New York (state)", "York",
         "The New York Times", "José Mourinho", "Mourinho", "Zürich", "Zurich Airport", "Apple Inc.",
         "Apple", "Apple Records", "Amazon River", "Amazon (company)", "Mercury (planet)",
         "Freddie Mercury", "Queen (band)", "Elizabeth II", "Queen Elizabeth The Queen Mother"]
QUERIES = ["Obama", "barack obama", "Michael Jordan", "jordan", "Paris", "new york", "Mourinho",
           "Zurich", "apple", "Amazon", "queen", "Mercury", "Elizabeth", "Jose Mourinho"]


# --- fidelity to fuzzywuzzy (DIM's search_fuzz) -------------------------------------------------

def test_process_name_is_fuzzywuzzys_full_process():
    utils = pytest.importorskip("fuzzywuzzy.utils")
    tricky = ["Müller", "José Mourinho", "Łódź", "São Paulo", "Ærø", "naïve café", "ΑΘΗΝΑ", "北京市",
              "snake_case-name", "  A.B.C.  ", "R&B (genre)", "tab\tand\nnewline", "Straße",
              "İstanbul", "¿Qué?", "!!!", "", "ＦＵＬＬＷＩＤＴＨ", "x\u00a0y", "O'Brien"]
    for s in tricky:
        # extract() runs full_process(force_ascii=True) on the query and every choice.
        assert process_name(s) == utils.full_process(s, force_ascii=True), s


def test_strong_matches_agree_with_fuzzywuzzy_extract():
    """Every name fuzzywuzzy scores >= 85 is in our list with the same (rounded) score, and only those."""
    process = pytest.importorskip("fuzzywuzzy.process")
    for q in QUERIES:
        ranked = process.extract(q, NAMES, limit=None)
        strong = [(n, s) for n, s in ranked if s >= 85]
        assert strong, q
        k = len(strong)  # the cut falls between a score >= 85 and one < 85: no tie at the cut
        r = rank_names([q], NAMES, k)
        ours = [(NAMES[i], int(round(float(s)))) for i, s in zip(r.indices[0], r.scores[0])]
        assert {n for n, _ in ours} == {n for n, _ in strong}, q
        assert sorted(s for _, s in ours) == sorted(s for _, s in strong), q
        # fuzzywuzzy keeps list order among equal scores; so do we (KB row order)
        if len({s for _, s in strong}) == 1:
            assert [n for n, _ in ours] == [n for n, _ in strong], q


def test_weak_partial_matches_may_score_higher_than_fuzzywuzzy():
    """Documented difference: rapidfuzz's partial_ratio takes the best alignment."""
    fuzz = pytest.importorskip("fuzzywuzzy.fuzz")
    fw = fuzz.WRatio("anne", "city york battle")
    r = rank_names(["anne"], ["city york battle"], 1)
    assert fw < float(r.scores[0, 0]) < 50


# --- rank_names: exactness of the pruning, ties, edge cases --------------------------------------

def _random_strings(rng: random.Random, n: int, words: list[str]) -> list[str]:
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.03:
            out.append(rng.choice(["", "!!!", "--", "é"]))  # empty after processing
        elif r < 0.06:
            out.append(" ".join(rng.choice(words) for _ in range(12)))  # long, > 64 characters
        elif r < 0.1:
            w = rng.choice(words)
            out.append(f"{w} {w} {rng.choice(words)}")  # a repeated token
        else:
            toks = [rng.choice(words) for _ in range(rng.choice([1, 1, 2, 2, 3, 4]))]
            s = " ".join(toks)
            if rng.random() < 0.3 and len(s) > 3:  # a typo
                i = rng.randrange(len(s))
                s = s[:i] + rng.choice("aeioux") + s[i + 1:]
            out.append(rng.choice([s, s.title(), s.upper() + "!", f"{s} (band)"]))
    return out


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 5), (2, 40), (3, 1000)])
def test_pruned_ranking_equals_plain_cdist_wratio(seed, k):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdeilmnorstu") for _ in range(rng.randint(1, 9)))
             for _ in range(60)] + ["of", "the", "jordan", "paris", "x"]
    names = _random_strings(rng, 400, words)
    names += names[:15]  # repeated names: each entity keeps its place
    queries = _random_strings(rng, 150, words)
    a = rank_names(queries, names, k)
    b = rank_names(queries, names, k, strategy="full")
    assert a.indices.shape == (len(queries), min(k, len(names)))
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.indices, b.indices)


def test_chunks_scored_in_parallel_threads_give_the_same_lists_in_order():
    """Small chunks on three threads: every query's list lands in its own row, as on one thread."""
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdeilmnorstu") for _ in range(rng.randint(1, 9))) for _ in range(60)]
    names = _random_strings(rng, 300, words)
    queries = _random_strings(rng, 200, words)
    chunk = 8 * len(names) * 7  # seven queries a chunk: about thirty chunks
    one = rank_names(queries, names, 10, workers=1, chunk_bytes=chunk)
    three = rank_names(queries, names, 10, workers=3, chunk_bytes=chunk)
    whole = rank_names(queries, names, 10, strategy="full")
    for other in (three, whole):
        np.testing.assert_array_equal(one.indices, other.indices)
        np.testing.assert_array_equal(one.scores, other.scores)


def test_ties_follow_name_order_and_duplicates_all_appear():
    names = ["Paris Hilton", "Paris", "PARIS", "Paris!", "Parish"]
    r = rank_names(["paris"], names, 5)
    got = [names[i] for i in r.indices[0]]
    assert got[:3] == ["Paris", "PARIS", "Paris!"]  # score 100, in list order
    assert list(r.scores[0][:3]) == [100, 100, 100]
    assert np.all(np.diff(r.scores[0]) <= 0)


def test_equal_queries_share_a_list():
    r = rank_names(["Jordan", "Paris", "Jordan", "jordan!"], NAMES, 4)
    np.testing.assert_array_equal(r.indices[0], r.indices[2])
    np.testing.assert_array_equal(r.indices[0], r.indices[3])  # equal after processing


def test_k_larger_than_kb_and_empty_inputs():
    r = rank_names(["york"], ["York", "New York", "Yorkshire"], 100)
    assert r.indices.shape == (1, 3)
    assert sorted(r.indices[0].tolist()) == [0, 1, 2]
    assert rank_names([], ["a"], 5).indices.shape == (0, 1)
    assert rank_names(["a"], [], 5).indices.shape == (1, 0)
    with pytest.raises(ConfigError):
        rank_names(["a"], ["a"], 0)


def test_punctuation_only_mention_gets_the_first_k_entities_with_score_zero():
    # fuzzywuzzy scores such a query 0 against everything and returns the first `limit` choices.
    r = rank_names(["?!", ""], ["Paris", "???", "Jordan", "York"], 3)
    assert r.indices.tolist() == [[0, 1, 2], [0, 1, 2]]
    assert float(r.scores.max()) == 0.0
    # a name that processes to "" scores 0 and never outranks a real match
    r = rank_names(["paris"], ["???", "Paris"], 2)
    assert r.indices[0].tolist() == [1, 0]


# --- build_candidates on a prepared dataset ------------------------------------------------------

def _tiny(root, meta=None, lists=None):
    mentions = pd.DataFrame({
        "mention_id": ["m1", "m2", "m3", "m4", "m5", "m6"],
        "split": ["train", "train", "dev", "dev", "test", "test"],
        "sentence": ["s"] * 6,
        "mention": ["Jordan", "Jordan", "Pariss", "??", "Michael Jordan", "York"],
        "image": [None] * 6,
        "qid": ["Q1", "Q2", "Q3", None, "Q4", "Q5"],
    })
    entities = pd.DataFrame({
        "qid": ["Q1", "Q2", "Q3", "Q4", "Q5", "Q6"],
        "name": ["Jordan", "Jordan", "Paris", "Michael Jordan", "York", "New York"],
        "description": [None] * 6,
        "description_source": ["none"] * 6,
        "images": [[] for _ in range(6)],
    })
    cands = None
    if lists is not None:
        cands = pd.DataFrame({"mention_id": mentions["mention_id"], "qids": lists})
    datasets.write_prepared(root, mentions, entities, meta or {"layout": "test"}, candidates=cands)


def build_candidates(ds, *, progress: bool = False, **settings):
    """Build the lists of a loaded dataset through the stage (``candidates.run``): (lists, report)."""
    report = candidates.run(candidates.CandidatesConfig.for_dataset(ds.name, **settings), dataset=ds,
                            progress=progress)
    return report.candidates, report


def test_build_candidates_lists_recall_and_files(kit_dirs):
    _tiny(kit_dirs["data"] / "tiny")
    ds = datasets.load("tiny")
    df, report = build_candidates(ds, k=1, progress=False)
    lists = dict(zip(df["mention_id"], df["qids"]))
    assert list(df["mention_id"]) == ["m1", "m2", "m3", "m4", "m5", "m6"]
    assert lists["m1"] == lists["m2"] == ["Q1"]  # same string, same list; name tie -> KB order
    assert lists["m3"] == ["Q3"] and lists["m5"] == ["Q4"] and lists["m6"] == ["Q5"]
    assert lists["m4"] == ["Q1"]  # "??" scores 0 everywhere: the first entity
    # gold of m2 (the second "Jordan") is missed at k=1; m4 is NIL and left out
    assert (report.n_gold_mentions, report.n_hits) == (5, 4)
    assert report.recall == pytest.approx(0.8)
    assert report.recall_by_split["train"] == {"n_gold_mentions": 2, "n_hits": 1, "recall": 0.5}
    assert report.recall_by_split["dev"]["recall"] == 1.0
    assert report.n_distinct_mentions == 5 and report.n_empty_mentions == 1
    assert report.n_entities == 6 and report.k == 1 and not report.reused

    again = datasets.load("tiny")
    stored = again.candidates
    assert stored["qids"].map(list).tolist() == df["qids"].tolist()
    on_disk = json.loads((again.root / "reports" / "candidates.json").read_text())
    assert on_disk["recall"] == pytest.approx(0.8) and on_disk["k"] == 1
    assert "recall@1" in str(report) and "80.00%" in str(report)
    assert again.meta["candidates"]["source"] == candidates.BUILT_SOURCE
    assert again.meta["candidates"]["k"] == 1 and again.meta["counts"]["mentions"] == 6

    df2, report2 = build_candidates(again, k=2, progress=False)
    lists2 = dict(zip(df2["mention_id"], df2["qids"]))
    assert lists2["m1"] == lists2["m2"] == ["Q1", "Q2"]  # every entity with the name
    assert report2.recall == 1.0


def test_rerun_reuses_identical_lists_unless_forced(kit_dirs, monkeypatch):
    _tiny(kit_dirs["data"] / "tiny")
    ds = datasets.load("tiny")
    df, _ = build_candidates(ds, k=2, progress=False)

    def boom(*a, **kw):
        raise AssertionError("recomputed")
    monkeypatch.setattr(candidates, "rank_names", boom)
    df2, report2 = build_candidates(datasets.load("tiny"), k=2, progress=False)
    assert report2.reused and df2["qids"].map(list).tolist() == df["qids"].tolist()
    with pytest.raises(AssertionError, match="recomputed"):
        build_candidates(datasets.load("tiny"), k=2, progress=False, force=True)
    with pytest.raises(AssertionError, match="recomputed"):
        build_candidates(datasets.load("tiny"), k=3, progress=False)


def test_released_lists_are_kept_unless_replaced(kit_dirs):
    released = [["Q6"]] * 6
    _tiny(kit_dirs["data"] / "tiny", meta={"layout": "dim", "candidates": {"source": "release"}},
          lists=released)
    df, report = build_candidates(datasets.load("tiny"), k=1, progress=False)
    assert not report.written and "release" in report.note
    # true of the DIM release and of the bundled sample (synthetic, in the DIM release layout) alike
    assert "the lists that came with the source (DIM release layout) and was kept" in report.note
    assert "of the DIM release" not in report.note
    assert report.recall == pytest.approx(0.8)  # of the built lists, returned all the same
    ds = datasets.load("tiny")
    assert ds.candidates["qids"].map(list).tolist() == released
    assert ds.meta["candidates"] == {"source": "release"}
    assert (ds.root / "reports" / "candidates.json").exists()

    df, report = build_candidates(ds, k=1, progress=False, replace_released=True)
    assert report.written
    ds = datasets.load("tiny")
    assert ds.candidates["qids"].map(list).tolist() == df["qids"].tolist()
    assert ds.meta["candidates"]["source"] == candidates.BUILT_SOURCE
    assert ds.meta["candidates"]["replaced"] == {"source": "release"}
    assert build_candidates(ds, k=1, progress=False)[1].reused


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_released_lists_that_are_gone_are_named_with_the_way_back(kit_dirs, capsys, damage):
    _tiny(kit_dirs["data"] / "tiny", meta={"layout": "dim", "candidates": {"source": "release"}},
          lists=[["Q6"]] * 6)
    path = kit_dirs["data"] / "tiny" / "candidates.parquet"
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:40])
    assert cli.main(["candidates", "tiny", "--k", "1"]) == 2
    err = capsys.readouterr().err
    assert "candidates.parquet" in err and "--force" in err and "--replace-released" in err
    assert "the candidate lists that came with the source (DIM release layout)" in err
    assert "Traceback" not in err
    _, report = build_candidates(datasets.load("tiny"), k=1, progress=False, replace_released=True)
    assert report.written and len(datasets.load("tiny").candidates) == 6


def test_empty_kb_and_bad_k_are_refused(kit_dirs):
    mentions = pd.DataFrame({"mention_id": ["m1"], "split": ["train"], "sentence": ["s"],
                             "mention": ["x"], "image": [None], "qid": [None]})
    entities = pd.DataFrame({"qid": pd.Series([], dtype=str), "name": pd.Series([], dtype=str),
                             "description": pd.Series([], dtype=object),
                             "description_source": pd.Series([], dtype=str),
                             "images": pd.Series([], dtype=object)})
    datasets.write_prepared(kit_dirs["data"] / "nokb", mentions, entities, {"layout": "test"})
    with pytest.raises(DataError, match="no entities"):
        build_candidates(datasets.load("nokb"), progress=False)
    _tiny(kit_dirs["data"] / "tiny")
    with pytest.raises(ConfigError):
        build_candidates(datasets.load("tiny"), k=0, progress=False)


def test_cli_candidates(kit_dirs, capsys):
    _tiny(kit_dirs["data"] / "tiny")
    assert cli.main(["candidates", "tiny", "--k", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "recall@2" in out and "100.00%" in out
    assert f"wrote {kit_dirs['data'] / 'tiny' / 'candidates.parquet'} and " in out
    assert (kit_dirs["data"] / "tiny" / "candidates.parquet").exists()
    assert cli.main(["candidates", "missing-dataset"]) == 2
    assert cli.main(["candidates", "tiny", "--k", "0"]) == 2
    assert "--k must be a positive whole number, got 0" in capsys.readouterr().err
    assert cli.main(["candidates", "tiny", "--workers", "0"]) == 2
    assert "--workers must be -1 (all cores) or a positive number, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"^workers must be -1 \(all cores\) or a positive number, got -2$"):
        candidates.CandidatesConfig.for_dataset("tiny", workers=-2)


def test_recall_says_what_the_knowledge_base_is(kit_dirs, tmp_path, capsys):
    """A MELBench raw file's KB holds only its gold entities: recall over it is not a full-KB recall."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import fixtures_prepare as fx
    from dimkit import prepare

    prepare.run(prepare.PrepareConfig(src=fx.build_melbench_wikidata(tmp_path / "mb"), dataset="wdmel"))
    assert cli.main(["candidates", "wdmel", "--k", "5"]) == 0
    out = capsys.readouterr().out
    assert "knowledge base: 20 entities, only the gold entities of the mentions" in out
    stored = json.loads((kit_dirs["data"] / "wdmel" / "reports" / "candidates.json").read_text())
    assert "upper bound" in stored["kb"]
    assert cli.main(["candidates", "wdmel", "--k", "5"]) == 0  # reused lists say it too
    assert "only the gold entities" in capsys.readouterr().out

    _tiny(kit_dirs["data"] / "tiny")  # Q6 is nobody's gold: a distractor
    _, report = build_candidates(datasets.load("tiny"), k=2, progress=False)
    assert report.kb == "6 entities: 5 gold entities of the mentions and 1 others"
