"""Fuzzy candidate lists: DIM's ``search_top100`` (notebook ``00_data``).

DIM's ``search_fuzz`` ran ``fuzzywuzzy.process.extract(mention, list(ne2qid.keys()), limit=100)`` once per
mention string and did not insert the gold. :func:`rank_names` computes the same top k with RapidFuzz over
the distinct mention strings, in chunks of bounded memory: WRatio's cheap parts are scored for every
pair, its expensive ones only where an upper bound says they can reach the top k (:class:`_Scorer`). The
lists and scores are those of ``cdist(scorer=fuzz.WRatio)`` on all pairs (``strategy="full"``; the tests
compare the two, ``benchmarks/bench_candidates.py`` measures both against DIM's loop).

Where they can differ from fuzzywuzzy 0.18's: the processing is the same (:func:`process_name` deletes
U+0080..U+00FF as ``force_ascii`` does: "Müller" -> "mller"), but the score is RapidFuzz's float WRatio,
whose exact ``partial_ratio`` (strings 1.5 times longer or more) is often higher than fuzzywuzzy's
matching-block heuristic, mostly for weak matches far below the cut. Ties, and entities sharing a name
(each takes one of the k places), follow KB row order; a mention that processes to "" scores 0 with every
entity and gets the first k, as in fuzzywuzzy (``n_empty_mentions`` counts them).

:func:`run` (``dimkit candidates NAME``) applies this WikiMEL/RichpediaMEL rule to every dataset; DIM built
WikiDiverse's lists differently (docs/fidelity.md row 11), so lists built here for it are not DIM's.
"""
from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar, NamedTuple, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import atomic, datasets
from .errors import ConfigError, DataError, option
from .stage import Config, Result, load_dataset, setting
from .store import content_hash, make_key

#: Bump when the ranking (processing, scorer, tie order) changes: stored lists are then rebuilt.
CANDIDATES_VERSION = "1"
REPORT_FILE = Path("reports") / "candidates.json"
#: ``meta.json["candidates"]["source"]`` of lists built here; ``prepare`` marks imported ones "release".
BUILT_SOURCE = "dimkit.candidates"
#: Memory of one float64 score matrix per chunk (mentions x names); a few such live at once.
DEFAULT_CHUNK_BYTES = 32 * 2**20

# fuzzywuzzy's force_ascii deletes exactly these code points (its "bad_chars", chr(128)..chr(255)).
_LATIN1_DELETE = {c: None for c in range(128, 256)}
_NON_WORD = re.compile(r"\W", re.UNICODE | re.IGNORECASE)


def _scorer_id() -> str:
    import rapidfuzz
    return f"rapidfuzz-{rapidfuzz.__version__}/WRatio/fuzzywuzzy-full_process-ascii"


def process_name(text: str) -> str:
    """Normalise a mention or entity name as fuzzywuzzy's ``extract`` does: U+0080..U+00FF deleted, every
    non-word character a space, lower case, stripped."""
    s = str(text).translate(_LATIN1_DELETE)
    s = _NON_WORD.sub(" ", s)
    return s.lower().strip()


class Ranking(NamedTuple):
    """Top-k result of :func:`rank_names`: rows follow the queries, columns the rank."""

    indices: np.ndarray  # [Q, k'] int64 positions in ``names``, k' = min(k, len(names))
    scores: np.ndarray   # [Q, k'] float32 WRatio in 0..100, non-increasing along a row


def _top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top k per row, ordered by score desc then column asc (a deterministic tie order)."""
    n_rows, n_cols = scores.shape
    if k >= n_cols:
        order = np.argsort(-scores, axis=1, kind="stable")  # stable: ties keep column order
        return order, np.take_along_axis(scores, order, axis=1)
    # The k-th largest score of each row; every column at or above it is a contender.
    kth = np.partition(scores, n_cols - k, axis=1)[:, n_cols - k]  # [R]
    idx = np.empty((n_rows, k), dtype=np.int64)
    for r in range(n_rows):
        row = scores[r]
        cand = np.flatnonzero(row >= kth[r])  # ascending columns, at least k of them
        order = np.argsort(-row[cand], kind="stable")[:k]
        idx[r] = cand[order]
    return idx, np.take_along_axis(scores, idx, axis=1)


class _Strings:
    """Distinct processed strings and the pieces of WRatio computed from each of them once."""

    def __init__(self, keys: list[str]):
        tokens = [key.split() for key in keys]
        self.p = np.array(keys, dtype=object)                                       # processed string
        self.s = np.array([" ".join(sorted(t)) for t in tokens], dtype=object)       # tokens sorted
        self.d = np.array([" ".join(sorted(set(t))) for t in tokens], dtype=object)  # distinct tokens sorted
        self.len_i = np.array([len(x) for x in self.p], dtype=np.int64)
        self.len_p = self.len_i.astype(np.float64)
        self.len_s = np.array([len(x) for x in self.s], dtype=np.float64)
        self.len_d = np.array([len(x) for x in self.d], dtype=np.float64)
        self.sorted_differs = np.array([a != b for a, b in zip(self.p, self.s)], dtype=bool)
        self.dup = np.array([len(t) != len(set(t)) for t in tokens], dtype=bool)
        self.empty = self.len_p == 0
        self.tokens = [set(t) for t in tokens]


#: Slack on bounds and thresholds: bounds are computed in float32 and rapidfuzz's own arithmetic
#: may differ in the last bit; a looser bound only costs a few more exact scores.
_SLACK = 1e-3


def _partial_bound(ratio_: np.ndarray, len_sum: np.ndarray, short: np.ndarray) -> np.ndarray:
    """Upper bound of partial_ratio(a, b) from ratio(a, b), |a| + |b| and the shorter length.

    fuzz.ratio = 100 * (1 - indel/(|a|+|b|)) and indel = |a|+|b| - 2*LCS, so the ratio gives the
    LCS exactly. Every window w that partial_ratio compares with the shorter string (length m)
    has |w| <= m and LCS(short, w) <= min(|w|, LCS(a, b)), so its ratio 200*LCS/(m+|w|) is at
    most 200*B/(m+B) with B = min(LCS(a, b), m). Arrays broadcast; the result is float32.
    """
    lcs = np.asarray(ratio_, dtype=np.float32) * np.float32(1 / 200)
    lcs *= len_sum
    np.rint(lcs, out=lcs)
    np.minimum(lcs, short, out=lcs)  # B
    denom = lcs + short
    np.maximum(denom, 1, out=denom)  # m = 0 only for empty strings, scored 0 anyway
    lcs *= 200
    lcs /= denom
    return lcs


class _Scorer:
    """WRatio of query chunks against all names, exact wherever it can reach the top k.

    WRatio(a, b) is the max of ratio, token_sort/token_set (similar lengths) or partial_ratio,
    partial_token_sort/partial_token_set (one string 1.5 times longer), each scaled. The cheap
    parts (ratio on the strings, sorted tokens and distinct tokens; bit-parallel in rapidfuzz) are
    computed for every pair; they are WRatio itself for similar-length pairs without a shared token
    and a lower bound elsewhere. The k-th largest lower bound of a row is a threshold no top-k
    score falls below; the expensive parts are then computed only for pairs whose upper bound
    (from the LCS that ratio implies) reaches the threshold, best bounds first so the threshold
    rises early. The result equals ``cdist(..., scorer=fuzz.WRatio)`` on every pair that can be in
    the top k, and is a lower bound below the threshold (tests check it against the plain cdist).
    """

    #: pairs per query scored in each pass over partial_ratio, best upper bounds first
    PASSES = (200, 400)

    def __init__(self, names: _Strings, name_pos: np.ndarray, k: int, workers: int):
        self.n = names
        self.k = k
        self.workers = workers
        self.n_entities = len(name_pos)
        # Expanding to entities matters for the threshold only when names repeat.
        self.name_pos = None if len(name_pos) == len(names.p) else name_pos
        postings: dict[str, list[int]] = {}
        for j, toks in enumerate(names.tokens):
            for t in toks:
                postings.setdefault(t, []).append(j)
        self.postings = {t: np.asarray(js, dtype=np.int64) for t, js in postings.items()}
        self.dup_cols = np.flatnonzero(names.dup)

    def _kth(self, S: np.ndarray) -> np.ndarray:
        if self.k >= self.n_entities:
            return np.full(S.shape[0], -np.inf)
        E = (S if self.name_pos is None else S[:, self.name_pos]).astype(np.float32)
        E.partition(self.n_entities - self.k, axis=1)
        # float32 rounds by less than the slack; the threshold must never exceed the true k-th.
        return E[:, self.n_entities - self.k].astype(np.float64) - _SLACK

    def _pairs(self, scorer, a: np.ndarray, b: np.ndarray, I: np.ndarray, J: np.ndarray) -> np.ndarray:
        from rapidfuzz import process
        if len(I) == 0:
            return np.empty(0, dtype=np.float64)
        return process.cpdist(a[I], b[J], scorer=scorer, processor=None, dtype=np.float64,
                              workers=self.workers)

    def scores(self, q: _Strings, rows: np.ndarray) -> np.ndarray:
        """[len(rows), U] float64: WRatio wherever it can reach the k-th best of its row."""
        from rapidfuzz import fuzz, process
        n, w = self.n, self.workers
        qp, qs, qd = q.p[rows], q.s[rows], q.d[rows]
        c, U = len(rows), len(n.p)
        R = process.cdist(qp, n.p, scorer=fuzz.ratio, processor=None, dtype=np.float64, workers=w)
        S = process.cdist(qs, n.s, scorer=fuzz.ratio, processor=None, dtype=np.float64, workers=w)
        TS = S.copy()
        lq, ln = q.len_i[rows][:, None], n.len_i[None, :]
        mx, mn = np.maximum(lq, ln), np.minimum(lq, ln)
        full = 2 * mx < 3 * mn  # WRatio's length ratio < 1.5 (exact in integers)   [c, U]
        near = mx <= 8 * mn     # length ratio <= 8: partial scale 0.9, else 0.6       [c, U]
        del mx
        common = np.zeros((c, U), dtype=bool)  # pairs sharing a token
        for r, i in enumerate(rows):
            for t in q.tokens[i]:
                cols = self.postings.get(t)
                if cols is not None:
                    common[r, cols] = True
        q_empty, n_empty = q.empty[rows], n.empty  # WRatio is 0 when a side is empty

        # Similar lengths: max(ratio, 0.95*token_sort, 0.95*token_set); without a shared token,
        # token_set is the ratio of the distinct sorted tokens, i.e. token_sort unless a side
        # repeats a token. With a shared token this is a lower bound (scored exactly below).
        S *= 0.95
        np.maximum(S, R, out=S)
        np.copyto(S, R, where=~full)
        dq = np.flatnonzero(q.dup[rows])
        if len(dq):
            TD = process.cdist(qd[dq], n.d, scorer=fuzz.ratio, processor=None, dtype=np.float64, workers=w)
            m = full[dq] & ~common[dq]
            S[dq] = np.where(m, np.maximum(S[dq], TD * 0.95), S[dq])
        dn = self.dup_cols
        if len(dn):
            TD = process.cdist(qd, n.d[dn], scorer=fuzz.ratio, processor=None, dtype=np.float64, workers=w)
            m = full[:, dn] & ~common[:, dn]
            S[:, dn] = np.where(m, np.maximum(S[:, dn], TD * 0.95), S[:, dn])
        # Different lengths and a shared token: partial_token_set is 100.
        I, J = np.nonzero(common & ~full)
        S[I, J] = np.maximum(S[I, J], 100 * 0.95 * np.where(near[I, J], 0.9, 0.6))  # as WRatio computes it
        if q_empty.any():
            S[q_empty] = 0.0
        if n_empty.any():
            S[:, n_empty] = 0.0
        kth = self._kth(S)

        # Similar lengths with a shared token: WRatio itself (at most max(ratio, 95)).
        I, J = np.nonzero(common & full)
        ok = np.maximum(R[I, J], 95.0) + _SLACK >= kth[I]
        I, J = I[ok], J[ok]
        S[I, J] = np.maximum(S[I, J], self._pairs(fuzz.WRatio, qp, n.p, I, J))
        kth = self._kth(S)

        live = ~(q_empty[:, None] | n_empty[None, :])  # [c, U] pairs without an empty side

        def scale(I: np.ndarray, J: np.ndarray) -> np.ndarray:  # WRatio's partial scale, float64
            return np.where(near[I, J], 0.9, 0.6)

        ps32 = np.where(near, np.float32(0.9), np.float32(0.6))  # [c, U], for bounds only

        def bound(ratio_: np.ndarray, len_a: np.ndarray, len_b: np.ndarray, short: np.ndarray,
                  factor: float) -> np.ndarray:
            """[c, U] upper bound of factor * scale * partial_ratio from the same strings' ratio."""
            len_sum = (len_a[:, None] + len_b[None, :]).astype(np.float32)
            ub = _partial_bound(ratio_, len_sum, short.astype(np.float32))
            ub *= ps32
            ub *= np.float32(factor)
            ub += np.float32(_SLACK)
            return ub

        def open_pairs(ub: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return np.nonzero(mask & live & (ub >= kth[:, None]) & (ub > S))

        # Different lengths: partial_ratio of the strings, scaled by 0.9 or 0.6 ...
        UB = bound(R, q.len_p[rows], n.len_p, mn, 1.0)
        I, J = open_pairs(UB, ~full)
        ub = UB[I, J]
        del UB
        # ... best bounds first, in passes of growing size per query (PASSES), each against the
        # threshold raised by the exact scores of the passes before.
        order = np.lexsort((-ub, I))
        rank = np.empty(len(I), dtype=np.int64)
        rank[order] = np.arange(len(order)) - np.searchsorted(I[order], I[order], side="left")
        lo = 0
        for hi in (*np.cumsum(self.PASSES), None):
            sel = rank >= lo if hi is None else (rank >= lo) & (rank < hi)
            Ip, Jp, up = I[sel], J[sel], ub[sel]
            if lo > 0:
                kth = self._kth(S)
            ok = (up >= kth[Ip]) & (up > S[Ip, Jp])
            Ip, Jp = Ip[ok], Jp[ok]
            v = self._pairs(fuzz.partial_ratio, qp, n.p, Ip, Jp)
            S[Ip, Jp] = np.maximum(S[Ip, Jp], v * scale(Ip, Jp))
            if hi is None:
                break
            lo = hi
        kth = self._kth(S)

        # ... and, without a shared token, partial_token_sort (sorted tokens) and
        # partial_token_set (distinct sorted tokens; differs only where a side repeats a token),
        # scaled by 0.95 * (0.9 or 0.6). LCS of the distinct tokens is at most that of all tokens
        # (a subsequence of them), so the sorted tokens' ratio bounds both.
        pair_free = ~full & ~common
        need = q.sorted_differs[rows][:, None] | n.sorted_differs[None, :]
        UB = bound(TS, q.len_s[rows], n.len_s,
                   np.minimum(q.len_s[rows][:, None], n.len_s[None, :]), 0.95)
        I, J = open_pairs(UB, pair_free & need)
        v = self._pairs(fuzz.partial_ratio, qs, n.s, I, J)
        S[I, J] = np.maximum(S[I, J], v * 0.95 * scale(I, J))
        need = q.dup[rows][:, None] | n.dup[None, :]
        if need.any():
            UB = bound(TS, q.len_s[rows], n.len_s,
                       np.minimum(q.len_d[rows][:, None], n.len_d[None, :]), 0.95)
            I, J = open_pairs(UB, pair_free & need)
            v = self._pairs(fuzz.partial_ratio, qd, n.d, I, J)
            S[I, J] = np.maximum(S[I, J], v * 0.95 * scale(I, J))
        return S


def rank_names(queries: Sequence[str], names: Sequence[str], k: int = 100, *, workers: int = -1,
               chunk_bytes: int = DEFAULT_CHUNK_BYTES, progress: bool = False,
               strategy: str = "pruned") -> Ranking:
    """Top-k ``names`` for each query by fuzzy WRatio (fuzzywuzzy's processing; ties by position).

    ``strategy="pruned"`` (default) scores the expensive parts of WRatio only where they can reach
    the top k; ``"full"`` runs ``rapidfuzz.process.cdist(scorer=fuzz.WRatio)`` on every pair. Both
    give the same lists and scores. ``workers`` threads (-1: every core) score chunks of queries side
    by side: numpy and rapidfuzz release the GIL, and most of the pruned scorer's time is numpy.
    """
    from rapidfuzz import fuzz, process

    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    if strategy not in ("pruned", "full"):
        raise ConfigError(f"strategy must be 'pruned' or 'full', got {strategy!r}")
    names = list(names)
    queries = list(queries)
    kk = min(k, len(names))
    if not queries or not names:
        return Ranking(np.zeros((len(queries), kk), np.int64), np.zeros((len(queries), kk), np.float32))

    # Score each distinct processed string once: KBs repeat names, datasets repeat mentions.
    name_pos, name_keys = pd.factorize(pd.Series([process_name(n) for n in names], dtype=object))
    query_pos, query_keys = pd.factorize(pd.Series([process_name(q) for q in queries], dtype=object))
    name_keys, query_keys = list(name_keys), list(query_keys)  # name_pos: [N] -> row of name_keys
    expand = len(name_keys) != len(names)

    n_rows = max(1, int(chunk_bytes // (8 * max(len(name_keys), len(names)))))
    top_idx = np.empty((len(query_keys), kk), dtype=np.int64)
    top_scores = np.empty((len(query_keys), kk), dtype=np.float32)
    starts = range(0, len(query_keys), n_rows)
    # the full strategy's cdist has threads of its own; the pruned one scores `threads` chunks at once
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = min(len(starts), workers if workers > 0 else cores) if strategy == "pruned" else 1
    if strategy == "pruned":
        qs = _Strings(query_keys)
        scorer = _Scorer(_Strings(name_keys), name_pos, kk, 1 if threads > 1 else workers)

    def chunk(start: int) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        rows = np.arange(start, min(start + n_rows, len(query_keys)))
        if strategy == "pruned":
            s = scorer.scores(qs, rows).astype(np.float32)  # [R, U], as cdist's float32 output
        else:
            # processor=None: strings are already processed the fuzzywuzzy way.
            s = process.cdist([query_keys[i] for i in rows], name_keys, scorer=fuzz.WRatio,
                              processor=None, dtype=np.float32, workers=workers)  # [R, U]
        if expand:
            s = s[:, name_pos]  # [R, N]: one column per name, duplicates included
        return rows, _top_k(s, kk)

    with ThreadPoolExecutor(threads) as pool:  # results come back in chunk order
        # disable is passed only to switch the bar off, so that TQDM_DISABLE=1 still works otherwise.
        for rows, (i, v) in tqdm(pool.map(chunk, starts), total=len(starts), desc="candidates", unit="chunk",
                                 **({} if progress else {"disable": True})):
            top_idx[rows] = i
            top_scores[rows] = v
    return Ranking(top_idx[query_pos], top_scores[query_pos])


@dataclass
class CandidatesConfig(Config):
    """What ``dimkit candidates NAME`` builds."""

    STAGE: ClassVar[str] = "candidates"

    dataset: str = setting(None, "prepared dataset name (e.g. sample, rich+)", positional=True)
    k: int = setting(100, "candidates per mention (DIM: 100)", min=1)
    workers: int = setting(-1, "threads for scoring (-1: all cores)")
    force: bool = setting(False, "rebuild even if identical lists exist")
    replace_released: bool = setting(False, "overwrite the lists that came with the source (DIM release layout; "
                                             "kept by default)")

    def check(self) -> None:
        """``workers`` is -1 (all cores) or a positive count."""
        if self.workers == 0 or self.workers < -1:
            raise ConfigError(f"{self.label('workers')} must be -1 (all cores) or a positive number, "
                              f"got {self.workers}")


@dataclass
class CandidateReport(Result):
    """What :func:`run` did: sizes, recall of the gold within the lists, time; ``candidates`` holds the lists."""

    dataset: str
    k: int
    n_mentions: int
    n_distinct_mentions: int
    n_entities: int
    n_gold_mentions: int          # mentions with a gold qid (NIL mentions are left out of recall)
    n_hits: int                   # of those, how many have the gold in their list
    recall: float | None          # recall@k = n_hits / n_gold_mentions
    recall_by_split: dict = field(default_factory=dict)  # split -> {n_gold_mentions, n_hits, recall}
    n_empty_mentions: int = 0     # distinct mention strings that process to "" (score 0 everywhere)
    n_empty_names: int = 0        # entities whose name processes to ""
    seconds: float = 0.0
    scorer: str = ""
    key: str = ""
    reused: bool = False          # True when the stored lists of an identical earlier run were loaded
    written: bool = True          # False when the dataset's released lists were kept (see note)
    kb: str = ""                  # what the knowledge base searched is: recall means little without it
    note: str = ""
    #: The lists (``mention_id``, ``qids``) and the dataset folder they belong to; not in the JSON report.
    candidates: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    root: Path | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (written to ``reports/candidates.json``)."""
        out = asdict(replace(self, candidates=None))
        del out["candidates"], out["root"]
        return out

    def summary(self) -> str:
        """Sizes, the knowledge base, recall@k overall and per split, time, and what was written."""
        def pct(r: float | None) -> str:
            return "n/a" if r is None else f"{100 * r:.2f}%"
        lines = [
            f"candidates for {self.dataset}: top-{self.k} fuzzy WRatio over {self.n_entities} entities",
            f"  knowledge base: {self.kb}",
            f"  mentions: {self.n_mentions} ({self.n_distinct_mentions} distinct strings"
            + (f", {self.n_empty_mentions} empty after processing" if self.n_empty_mentions else "")
            + ")",
            f"  recall@{self.k} of the gold: {pct(self.recall)} "
            f"({self.n_hits}/{self.n_gold_mentions} mentions with a gold qid)",
        ]
        for split, r in self.recall_by_split.items():
            lines.append(f"    {split:>5}: {pct(r['recall'])} ({r['n_hits']}/{r['n_gold_mentions']})")
        if self.n_empty_names:
            lines.append(f"  entities with an empty name after processing: {self.n_empty_names}")
        if self.reused:
            lines.append(f"  loaded the lists of an identical earlier run (built in {self.seconds:.1f}s, "
                         f"{self.scorer}); {option('force=True', '--force')} rebuilds them")
        else:
            lines.append(f"  built in {self.seconds:.1f}s ({self.scorer})")
        if self.note:
            lines.append(f"  note: {self.note}")
        if self.root is not None and not self.reused:
            lines.append(f"  wrote {self.root / 'candidates.parquet'} and {self.root / REPORT_FILE}" if self.written
                         else f"  wrote {self.root / REPORT_FILE} only")
        return "\n".join(lines)


def _content_key(ds: datasets.Dataset, k: int) -> str:
    m, e = ds.mentions, ds.entities
    content = {
        "k": int(k),
        "mentions": content_hash([[str(a), str(b), str(c), None if d is None or d != d else str(d)]
                                  for a, b, c, d in zip(m["mention_id"], m["split"], m["mention"], m["qid"])]),
        "entities": content_hash([[str(q), str(n)] for q, n in zip(e["qid"], e["name"])]),
    }
    return make_key("candidates", _scorer_id(), CANDIDATES_VERSION, content)


def describe_kb(ds: datasets.Dataset) -> str:
    """What the dataset's knowledge base is, said beside every recall: a KB that holds only the gold
    entities of the mentions (MELBench raw, the DIM release's qids_ordered.json) makes recall an
    upper bound of what a full KB would give."""
    golds = set(ds.mentions["qid"].dropna().astype(str))
    n = len(ds.entities)
    extra = n - len(golds & set(ds.entities["qid"].astype(str)))
    if extra == 0:
        return (f"{n:,} entities, only the gold entities of the mentions (no distractors): recall here is an "
                "upper bound of recall over a full knowledge base")
    return f"{n:,} entities: {n - extra:,} gold entities of the mentions and {extra:,} others"


def _recall(mentions: pd.DataFrame, lists: list[list[str]]) -> tuple[int, int, dict]:
    """Mentions with a gold qid and how many of them have it in their list; the same per split."""
    has_gold = mentions["qid"].notna()
    hit = pd.Series([g in c for g, c in zip(mentions["qid"], lists)], index=mentions.index) & has_gold
    by_split = {}
    for split in datasets.SPLITS:
        in_split = mentions["split"] == split
        if in_split.any():
            n, h = int((in_split & has_gold).sum()), int((in_split & hit).sum())
            by_split[split] = {"n_gold_mentions": n, "n_hits": h, "recall": h / n if n else None}
    return int(has_gold.sum()), int(hit.sum()), by_split


def _load_previous(ds: datasets.Dataset, key: str) -> CandidateReport | None:
    cand_path = ds.root / "candidates.parquet"
    try:
        stored = json.loads((ds.root / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    # The meta check matters: re-preparing a dataset may bring back released lists under the same key.
    if (stored.get("key") != key or (ds.meta.get("candidates") or {}).get("source") != BUILT_SOURCE
            or not cand_path.exists()):
        return None
    df = pd.read_parquet(cand_path)
    if df["mention_id"].tolist() != ds.mentions["mention_id"].tolist():
        return None
    stored["reused"] = True
    known = set(CandidateReport.__dataclass_fields__) - {"candidates", "root"}
    return CandidateReport(**{k: v for k, v in stored.items() if k in known}, candidates=df, root=ds.root)


def run(cfg: CandidatesConfig, *, dataset: datasets.Dataset | None = None, progress: bool = True) -> CandidateReport:
    """Build, write and report the top-k fuzzy candidate list of every mention (DIM's search_top100).

    Writes ``candidates.parquet`` (``mention_id``, ``qids``), ``reports/candidates.json`` and
    ``meta.json["candidates"]`` in the dataset folder; the report's ``candidates`` holds the lists.
    A rerun on unchanged mentions, entities and k loads the stored lists unless ``cfg.force``. Lists
    that came with a source in the DIM release layout (meta source "release": DIM's own for a DIM
    release, the shipped ones for the bundled sample) are kept unless ``cfg.replace_released``: the
    built lists are then returned and reported, not written.
    ``dataset``: the loaded ``cfg.dataset``, when the caller holds it.
    """
    cfg = cfg.replace()  # a checked copy
    ds = load_dataset(cfg, dataset)
    k = cfg.k
    entities = ds.entities
    if len(entities) == 0:
        raise DataError("the knowledge base has no entities: no candidates can be built",
                        file=ds.root / "entities.parquet", field="name")
    if (ds.meta.get("candidates") or {}).get("source") == "release" and not cfg.replace_released:
        _check_released_lists(ds)
    key = _content_key(ds, k)
    if not cfg.force:
        previous = _load_previous(ds, key)
        if previous is not None:
            ds._candidates = previous.candidates
            return previous

    t0 = time.perf_counter()
    mentions = ds.mentions
    distinct = pd.unique(mentions["mention"].astype(str)).tolist()
    ranking = rank_names(distinct, entities["name"].astype(str).tolist(), k, workers=cfg.workers,
                         progress=progress)
    qids = np.asarray(entities["qid"].astype(str).tolist(), dtype=object)
    per_string = {m: qids[row].tolist() for m, row in zip(distinct, ranking.indices)}
    lists = [per_string[m] for m in mentions["mention"].astype(str)]
    df = pd.DataFrame({"mention_id": mentions["mention_id"].astype(str).tolist(), "qids": lists})
    n_gold, n_hits, by_split = _recall(mentions, lists)
    seconds = time.perf_counter() - t0

    notes = []
    if datasets.base_name(ds.name) == "sample":
        notes.append("synthetic sample: recall says nothing about the paper's datasets")
    released = (ds.meta.get("candidates") or {}).get("source") == "release"
    write = not released or cfg.replace_released
    if not write:
        flag = option("replace_released=True", "--replace-released")
        notes.append(f"candidates.parquet holds the lists that came with the source (DIM release layout) and was "
                     f"kept; these built lists were not written ({flag} replaces them)")
    report = CandidateReport(
        dataset=ds.name, k=int(k), n_mentions=len(mentions), n_distinct_mentions=len(distinct),
        n_entities=len(entities), n_gold_mentions=n_gold, n_hits=n_hits,
        recall=n_hits / n_gold if n_gold else None, recall_by_split=by_split,
        n_empty_mentions=sum(1 for m in distinct if not process_name(m)),
        n_empty_names=sum(1 for n in entities["name"] if not process_name(n)),
        seconds=round(seconds, 3), scorer=_scorer_id(), key=key, written=write, kb=describe_kb(ds),
        note="; ".join(notes), candidates=df, root=ds.root)
    report_path = ds.root / REPORT_FILE
    if write:
        # Lists, then meta, then the report: the report's key vouches only for lists in place.
        report_path.unlink(missing_ok=True)
        datasets.write_candidates(ds.root, df)
        meta = dict(ds.meta)
        previous_meta = meta.get("candidates")
        meta["candidates"] = {"source": BUILT_SOURCE, "k": int(k), "scorer": report.scorer,
                              "keyed_by": "mention", "report": str(REPORT_FILE)}
        if released:
            meta["candidates"]["replaced"] = previous_meta
        atomic.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n",
                                   ds.root / "meta.json")
        ds.meta = meta
        ds._candidates = df
    report.save(report_path)
    return report


def _check_released_lists(ds: datasets.Dataset) -> None:
    """The source's lists that would be kept are there and readable; else say how to get lists back
    (keeping a missing file would leave training asking for candidates forever)."""
    path = ds.root / "candidates.parquet"
    flag = option("replace_released=True", "--replace-released")
    fix = (f"prepare the dataset again to restore the source's lists (`dimkit prepare SRC --name {ds.name} "
           f"--force`), or write the lists built here instead with {flag}")
    if not path.is_file():
        raise DataError(f"the candidate lists that came with the source (DIM release layout) are missing; {fix}",
                        file=path)
    try:
        ds.candidates
    except DataError as exc:
        raise DataError(f"the candidate lists that came with the source (DIM release layout) cannot be read "
                        f"({exc.reason}); {fix}", file=path) from None


#: The command line: ``dimkit candidates NAME`` takes the flags of :class:`CandidatesConfig`.
CONFIG = CandidatesConfig
