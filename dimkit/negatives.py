"""Negative entities for training (notebook ``03_train``): the released TF-IDF sampler and simpler ones.

The released code (``nel_model/dataset.py::neg_sample_online`` with the tables that
``data_process/wikipedia_process/sample_util.py`` writes to ``neg.json``) draws one "hard" negative
per sample each time the sample is loaded:

1. with probability 0.95 (and if the gold entity has any weighted token) pick a token of the gold
   entity's fact text with probability proportional to ``int(100 * tfidf)``, then an entity
   containing that token with probability proportional to the token's count in it;
2. otherwise (or if the gold has no weighted token) a uniformly random entity;
3. a draw equal to the gold is rejected and drawn again.

Two samplers implement it, on the same tables:

- :class:`TfidfNegativeSampler` keeps the tables as cumulative weights and samples a whole batch
  with numpy at once (the same distribution, a fraction of the memory). Its stream is a numpy
  ``Generator``. After 1,000 rejected rounds the remaining draws fall back to a uniform non-gold
  entity (the released loop would spin forever on an entity whose tokens occur nowhere else when
  every draw is a TF-IDF one; with ``hard_prob`` 0.95 the fallback is never reached in practice).
- :class:`ReleasedTfidfSampler` makes the released calls, one sample after the other, on its own
  ``random.Random(seed)``: ``random()`` to choose the branch, ``choice`` over the gold's
  repeated-token list and over the token's repeated-entity list, or ``randint`` over all entities.
  The repeated-id lists are kept as runs; indexing a run gives what indexing the expanded list
  gives, so ``choice`` consumes the stream exactly as on the released lists. Its state can be saved
  and restored (:meth:`ReleasedTfidfSampler.getstate`).

How the tables are built, and what differs from the released ``sample_util.py``:

- *Tokens*: NLTK's ``word_tokenize`` is replaced by a regular expression that keeps runs of word
  characters (with inner ``'`` or ``-``) and single punctuation marks as tokens; case is kept, as
  released. Contractions and possessives split differently from NLTK ("don't" and "writer's" stay
  one token), and a double quote stays ``"`` (NLTK turns it into two backquotes or two single
  quotes, which the released stop list then keeps), which changes a few tokens, not the method.
- *Stop list*: two are provided. :data:`RELEASED_STOP_TOKENS` is the released ``STOP_WORDS``:
  only ``, . ! : ' " ; / \\`` and the empty string, plus the attribute labels of the fact texts
  ("Sex", "Name", "Nick", "Occupation", "Birth", "Languages", "Religion", "Alma", "mater"), so
  brackets, hyphens, ``&``, ``?`` and the like stay tokens. :data:`DIMKIT_STOP_TOKENS` removes all
  of ``string.punctuation`` plus the same labels; it is dimkit's default (``stop_list=dimkit``),
  the released one is ``stop_list=released``.
- *TF-IDF*: gensim's ``TfidfModel`` defaults: raw term count times ``log2(N / df)``, L2-normalised
  per entity; terms in every entity get weight 0 and drop out. :class:`ReleasedTfidfSampler`
  truncates ``100 * weight`` with ``int`` as released; :class:`TfidfNegativeSampler` rounds
  ``floor(100 * weight + 1e-9)``, so a weight whose product lands a rounding error below an integer
  (``0.29 * 100 = 28.999...``) counts one more.
- *Token ids*: :class:`ReleasedTfidfSampler` numbers tokens as gensim's ``Dictionary`` does (each
  entity's new tokens in sorted order), which fixes the order of the repeated-id lists and so
  which entry a given random number picks; :class:`TfidfNegativeSampler` numbers them by first
  appearance (the order does not change its distribution).
- *Fact text*: ``"<name> [SEP]. <description or None>"`` as in ``build_text.py``.

With the same tables and seed, :class:`ReleasedTfidfSampler` returns what ``neg_sample_online``
would return after ``random.seed(seed)``; the tables themselves are not NLTK's and gensim's, so a
released run's exact negatives are not reproduced, only its procedure and stream.
"""
from __future__ import annotations

import json
import math
import random
import re
import string
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from .errors import ConfigError

#: Sampler names accepted by :class:`dimkit.train.TrainConfig` (``negatives``).
SAMPLERS = ("tfidf", "random", "candidates")

#: Attribute labels of the fact texts, removed by both stop lists.
ATTRIBUTE_LABELS = ("Sex", "Name", "Nick", "Occupation", "Birth", "Languages", "Religion", "Alma", "mater")
#: The released stop list (``sample_util.py``, ``STOP_WORDS``): nine punctuation marks, the empty
#: string and the attribute labels. Other punctuation (``( ) - & ?`` ...) stays a token.
RELEASED_STOP_TOKENS = frozenset([",", ".", "!", ":", "'", '"', ";", "/", "\\", ""] + list(ATTRIBUTE_LABELS))
#: dimkit's stop list (the default): every ``string.punctuation`` mark and the attribute labels.
DIMKIT_STOP_TOKENS = frozenset(list(string.punctuation) + list(ATTRIBUTE_LABELS))
#: Stop lists by name (the trainer's ``stop_list`` setting).
STOP_LISTS = {"released": RELEASED_STOP_TOKENS, "dimkit": DIMKIT_STOP_TOKENS}
#: Older name of :data:`DIMKIT_STOP_TOKENS`.
STOP_TOKENS = DIMKIT_STOP_TOKENS

_TOKEN_RE = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]")
_MAX_REJECT_ROUNDS = 10
# TF-IDF draws return the gold itself often (its own rare tokens carry most of its weight), so a
# cap of 10 rounds would send a visible share of such entities' draws to the uniform fallback
_TFIDF_MAX_ROUNDS = 1000


def tokenize(text: str) -> list[str]:
    """Split text into word and punctuation tokens (a plain stand-in for NLTK's word_tokenize)."""
    return _TOKEN_RE.findall(text or "")


def fact_text(name: str, description: str | None) -> str:
    """The released entity fact text: ``"<name> [SEP]. <description or None>"``."""
    return f"{name} [SEP]. {description if description else 'None'}"


def stop_tokens(stop_list: str | Iterable[str]) -> frozenset[str]:
    """A stop list by name (``"released"`` or ``"dimkit"``, see :data:`STOP_LISTS`) or as given."""
    if isinstance(stop_list, str):
        if stop_list not in STOP_LISTS:
            raise ConfigError(f"unknown stop list {stop_list!r}; choose from {', '.join(STOP_LISTS)}")
        return STOP_LISTS[stop_list]
    return frozenset(stop_list)


def _uniform_other(gold: np.ndarray, num_entities: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random entity different from each gold (shift by 1..E-1 modulo E)."""
    return (gold + 1 + rng.integers(0, num_entities - 1, size=gold.shape)) % num_entities


class RandomNegativeSampler:
    """Uniformly random non-gold entities."""

    name = "random"

    def __init__(self, num_entities: int):
        if num_entities < 2:
            raise ConfigError("negative sampling needs at least 2 entities in the KB")
        self.num_entities = int(num_entities)

    def sample(self, gold: np.ndarray, rng: np.random.Generator, rows: np.ndarray | None = None,
               k: int = 1) -> np.ndarray:
        """``[B]`` (k=1) or ``[B, k]`` entity indices, never the gold."""
        g = np.repeat(np.asarray(gold, dtype=np.int64)[:, None], k, axis=1)
        out = _uniform_other(g, self.num_entities, rng)
        return out[:, 0] if k == 1 else out


class _TfidfTables:
    """Inspection of the flat TF-IDF tables both TF-IDF samplers keep.

    ``_ent_tok[_ent_start[e]:_ent_start[e+1]]`` are entity e's weighted tokens and ``_ent_cum`` the
    running sum of their weights over the whole flat array; ``_tok_ent``, ``_tok_cum`` and
    ``_tok_start`` hold, per token, the entities containing it weighted by count.
    """

    vocab: dict[str, int]
    num_entities: int
    _ent_tok: np.ndarray
    _ent_cum: np.ndarray
    _ent_start: np.ndarray
    _tok_ent: np.ndarray
    _tok_cum: np.ndarray
    _tok_start: np.ndarray

    @staticmethod
    def _runs(ids: np.ndarray, cum: np.ndarray, start: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Segment i as (ids, per-id weights)."""
        a, b = int(start[i]), int(start[i + 1])
        seg = cum[a:b]
        prev = np.concatenate([[cum[a - 1] if a > 0 else 0], seg[:-1]]).astype(np.int64)
        return ids[a:b], seg - prev

    def token_weights(self, entity: int) -> dict[str, int]:
        """The ``int(100 * tfidf)`` weight of each token of one entity (for inspection and tests)."""
        inv = {i: t for t, i in self.vocab.items()}
        ids, w = self._runs(self._ent_tok, self._ent_cum, self._ent_start, entity)
        return {inv[int(t)]: int(n) for t, n in zip(ids, w)}

    def repeated_id_lists(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The tables in the released ``neg.json`` form: ``(tfidf_neg, neg_iid)``.

        ``tfidf_neg[e]``: entity e's token ids, each repeated by its weight; ``neg_iid[t]``: the
        entities containing token t, each repeated by its count. Expanded, so for small KBs only.
        """
        tfidf_neg = [np.repeat(*self._runs(self._ent_tok, self._ent_cum, self._ent_start, e))
                     for e in range(self.num_entities)]
        neg_iid = [np.repeat(*self._runs(self._tok_ent, self._tok_cum, self._tok_start, t))
                   for t in range(len(self.vocab))]
        return tfidf_neg, neg_iid


class TfidfNegativeSampler(_TfidfTables):
    """The released TF-IDF "hard" negatives, vectorised over a batch with a numpy ``Generator``.

    ``stop_list``: ``"dimkit"`` (default), ``"released"`` or a collection of tokens (see the module
    docstring for what differs from the released tables).
    """

    name = "tfidf"

    def __init__(self, texts: Sequence[str], hard_prob: float = 0.95,
                 stop_list: str | Iterable[str] = "dimkit"):
        self.num_entities = len(texts)
        if self.num_entities < 2:
            raise ConfigError("negative sampling needs at least 2 entities in the KB")
        self.hard_prob = float(hard_prob)
        self.stop_tokens = stop = stop_tokens(stop_list)
        vocab: dict[str, int] = {}
        counts: list[Counter] = []
        for text in texts:
            c = Counter(t for t in tokenize(text) if t not in stop)
            for t in c:
                if t not in vocab:
                    vocab[t] = len(vocab)
            counts.append(c)
        self.vocab = vocab
        n_docs = self.num_entities
        df = np.zeros(len(vocab), dtype=np.int64)
        for c in counts:
            for t in c:
                df[vocab[t]] += 1
        idf = np.log2(n_docs / np.maximum(df, 1))
        # entity -> weighted tokens (weight int(100 * tfidf)); token -> entities (weight = count)
        ent_tok, ent_w, ent_len = [], [], np.zeros(n_docs, dtype=np.int64)
        tok_ent: list[list[int]] = [[] for _ in vocab]
        tok_cnt: list[list[int]] = [[] for _ in vocab]
        for e, c in enumerate(counts):
            ids = np.fromiter((vocab[t] for t in c), dtype=np.int64, count=len(c))
            tf = np.fromiter(c.values(), dtype=np.float64, count=len(c))
            for tid, n in zip(ids.tolist(), tf.tolist()):
                tok_ent[tid].append(e)
                tok_cnt[tid].append(int(n))
            w = tf * idf[ids]
            norm = math.sqrt(float((w * w).sum()))
            if norm > 0:
                w = w / norm
            reps = np.floor(100.0 * w + 1e-9).astype(np.int64)
            keep = reps > 0
            ent_tok.append(ids[keep])
            ent_w.append(reps[keep])
            ent_len[e] = int(keep.sum())
        self._ent_tok = np.concatenate(ent_tok) if ent_tok else np.zeros(0, np.int64)
        self._ent_cum = np.cumsum(np.concatenate(ent_w)) if ent_w else np.zeros(0, np.int64)
        self._ent_start = np.concatenate([[0], np.cumsum(ent_len)])  # [E+1] into the flat arrays
        tok_len = np.array([len(x) for x in tok_ent], dtype=np.int64)
        self._tok_ent = np.array([e for x in tok_ent for e in x], dtype=np.int64)
        self._tok_cum = np.cumsum(np.array([n for x in tok_cnt for n in x], dtype=np.int64))
        self._tok_start = np.concatenate([[0], np.cumsum(tok_len)])

    @classmethod
    def from_entities(cls, names: Sequence[str], descriptions: Sequence[str | None],
                      hard_prob: float = 0.95, stop_list: str | Iterable[str] = "dimkit"
                      ) -> "TfidfNegativeSampler":
        """Build from KB names and descriptions through the released fact text."""
        return cls([fact_text(n, d) for n, d in zip(names, descriptions)], hard_prob=hard_prob,
                   stop_list=stop_list)

    @staticmethod
    def _draw(start: np.ndarray, cum: np.ndarray, seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One weighted draw inside each segment ``seg`` of a flat cumulative-weight array."""
        a, b = start[seg], start[seg + 1]
        base = np.where(a > 0, cum[np.maximum(a - 1, 0)], 0)
        total = cum[b - 1] - base
        target = base + np.floor(rng.random(seg.shape) * total).astype(np.int64)
        return np.searchsorted(cum, target, side="right")

    def sample(self, gold: np.ndarray, rng: np.random.Generator, rows: np.ndarray | None = None,
               k: int = 1) -> np.ndarray:
        """``[B]`` (k=1) or ``[B, k]`` negative entity indices, never the gold."""
        g = np.repeat(np.asarray(gold, dtype=np.int64)[:, None], k, axis=1).ravel()
        out = np.empty_like(g)
        todo = np.arange(g.shape[0])
        for _ in range(_TFIDF_MAX_ROUNDS):
            if todo.size == 0:
                break
            gt = g[todo]
            has = self._ent_start[gt + 1] > self._ent_start[gt]
            hard = (rng.random(todo.shape) < self.hard_prob) & has
            pick = rng.integers(0, self.num_entities, size=todo.shape)
            if hard.any():
                tok = self._ent_tok[self._draw(self._ent_start, self._ent_cum, gt[hard], rng)]
                pick[hard] = self._tok_ent[self._draw(self._tok_start, self._tok_cum, tok, rng)]
            out[todo] = pick
            todo = todo[pick == gt]
        if todo.size:
            out[todo] = _uniform_other(g[todo], self.num_entities, rng)
        out = out.reshape(-1, k)
        return out[:, 0] if k == 1 else out


class _Runs:
    """A repeated-id list (``[a] * n_a + [b] * n_b + ...``) kept as runs of a flat cumulative array.

    ``len`` and indexing give what the expanded list gives, so ``random.Random.choice`` on it
    draws the same random number and returns the same id as on the released list.
    """

    __slots__ = ("ids", "cum", "base", "size")

    def __init__(self, ids: np.ndarray, cum: np.ndarray, start: np.ndarray, i: int):
        a, b = int(start[i]), int(start[i + 1])
        self.ids, self.cum = ids[a:b], cum[a:b]
        self.base = int(cum[a - 1]) if a > 0 else 0
        self.size = int(cum[b - 1]) - self.base if b > a else 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.size:
            raise IndexError(i)
        return int(self.ids[np.searchsorted(self.cum, self.base + i, side="right")])


class ReleasedTfidfSampler(_TfidfTables):
    """The released TF-IDF negatives drawn as ``neg_sample_online`` draws them, on its own stream.

    Per gold entity g, in batch order, until ``k`` distinct non-gold entities are collected::

        r = rnd.random()
        if g has no weighted token or r > hard_prob:  cand = rnd.randint(0, N - 1)
        else:  cand = rnd.choice(neg_iid[rnd.choice(tfidf_neg[g])])
        if cand != g:  add cand to the set

    with ``rnd = random.Random(seed)`` (the released ``set_seed`` seeds Python's ``random`` with
    114514, the presets' seed). ``sample`` takes the numpy generator of the other samplers' interface
    and ignores it. Tables as the released ``sample_util.py`` builds them (gensim token ids,
    ``int(100 * tfidf)``), on dimkit's tokens and ``stop_list`` (``"released"`` by default).

    The released loop never ends for an entity whose tokens occur nowhere else when
    ``hard_prob`` is 1; after 10,000 rejected rounds the remaining draws of that sample are uniform
    (with ``hard_prob`` 0.95 that happens with probability below 1e-222).
    """

    name = "tfidf"
    draws = "released"
    _MAX_ROUNDS = 10_000

    def __init__(self, texts: Sequence[str], hard_prob: float = 0.95,
                 stop_list: str | Iterable[str] = "released", seed: int = 114514):
        self.num_entities = n_docs = len(texts)
        if n_docs < 2:
            raise ConfigError("negative sampling needs at least 2 entities in the KB")
        self.hard_prob = float(hard_prob)
        self.stop_tokens = stop = stop_tokens(stop_list)
        # gensim Dictionary + doc2bow: each text's new tokens get ids in sorted order;
        # a bag of words is (id, count) pairs sorted by id
        vocab: dict[str, int] = {}
        corpus: list[list[tuple[int, int]]] = []
        for text in texts:
            c = Counter(t for t in tokenize(text) if t not in stop)
            for t in sorted(t for t in c if t not in vocab):
                vocab[t] = len(vocab)
            corpus.append(sorted((vocab[t], n) for t, n in c.items()))
        self.vocab = vocab
        df = [0] * len(vocab)
        for bow in corpus:
            for tid, _ in bow:
                df[tid] += 1
        # gensim df2idf: log(N / df) / log(2); terms in every text (idf 0) drop out
        idf = [float(np.log(float(n_docs) / d) / np.log(2.0)) for d in df]
        ent_tok: list[int] = []
        ent_w: list[int] = []
        ent_len = np.zeros(n_docs, dtype=np.int64)
        tok_ent: list[list[int]] = [[] for _ in vocab]
        tok_cnt: list[list[int]] = [[] for _ in vocab]
        for e, bow in enumerate(corpus):
            for tid, n in bow:  # sample_util.build_inverted_index: entity e repeated n times
                tok_ent[tid].append(e)
                tok_cnt[tid].append(n)
            vec = [(tid, n * idf[tid]) for tid, n in bow if idf[tid] != 0.0]
            length = math.sqrt(sum(w * w for _, w in vec))
            if length > 0.0:
                vec = [(tid, w / length) for tid, w in vec]
            kept = 0
            for tid, w in vec:  # sample_util.build_tfidf: token repeated int(w * 100) times
                reps = int(w * 100) if abs(w) > 1e-12 else 0
                if reps > 0:
                    ent_tok.append(tid)
                    ent_w.append(reps)
                    kept += 1
            ent_len[e] = kept
        self._ent_tok = np.array(ent_tok, dtype=np.int64)
        self._ent_cum = np.cumsum(np.array(ent_w, dtype=np.int64))
        self._ent_start = np.concatenate([[0], np.cumsum(ent_len)])
        self._tok_ent = np.array([e for x in tok_ent for e in x], dtype=np.int64)
        self._tok_cum = np.cumsum(np.array([n for x in tok_cnt for n in x], dtype=np.int64))
        self._tok_start = np.concatenate([[0], np.cumsum([len(x) for x in tok_ent])]).astype(np.int64)
        self._rnd = random.Random(seed)

    @classmethod
    def from_entities(cls, names: Sequence[str], descriptions: Sequence[str | None],
                      hard_prob: float = 0.95, stop_list: str | Iterable[str] = "released",
                      seed: int = 114514) -> "ReleasedTfidfSampler":
        """Build from KB names and descriptions through the released fact text."""
        return cls([fact_text(n, d) for n, d in zip(names, descriptions)], hard_prob=hard_prob,
                   stop_list=stop_list, seed=seed)

    def seed(self, seed: int) -> None:
        """Restart the stream, as the released ``random.seed(seed)`` does."""
        self._rnd.seed(seed)

    def getstate(self) -> dict:
        """The stream's state as JSON-able data (for a checkpoint)."""
        version, internal, gauss_next = self._rnd.getstate()
        return {"version": version, "internal": list(internal), "gauss_next": gauss_next}

    def setstate(self, state: dict | str) -> None:
        """Continue the stream from :meth:`getstate`'s data (or its JSON text)."""
        if isinstance(state, str):
            state = json.loads(state)
        self._rnd.setstate((state["version"], tuple(state["internal"]), state["gauss_next"]))

    def _one(self, g: int, k: int) -> list[int]:
        """The released ``neg_sample_online(g, ..., max_sample_num=k)``, as entity indices."""
        rnd, n = self._rnd, self.num_entities
        tokens = _Runs(self._ent_tok, self._ent_cum, self._ent_start, g)
        cands: set[int] = set()
        rounds = 0
        while len(cands) < k:
            r = rnd.random()
            if not tokens.size or r > self.hard_prob or rounds >= self._MAX_ROUNDS:
                cand = rnd.randint(0, n - 1)
            else:
                word = rnd.choice(tokens)
                cand = rnd.choice(_Runs(self._tok_ent, self._tok_cum, self._tok_start, word))
            if cand != g:
                cands.add(cand)
            rounds += 1
        return list(cands)  # the released order: iteration order of the set

    def sample(self, gold: np.ndarray, rng: np.random.Generator | None = None, rows: np.ndarray | None = None,
               k: int = 1) -> np.ndarray:
        """``[B]`` (k=1) or ``[B, k]`` negatives (distinct per sample, never the gold); ``rng`` unused."""
        if k > self.num_entities - 1:
            raise ConfigError(f"{k} distinct negatives per sample need at least {k + 1} entities in the KB")
        g = np.asarray(gold, dtype=np.int64).ravel()
        out = np.array([self._one(int(x), k) for x in g], dtype=np.int64).reshape(len(g), k)
        return out[:, 0] if k == 1 else out


class CandidateNegativeSampler:
    """A random non-gold entity of the mention's own candidate list (hard, string-similar negatives).

    Not the released WikiDiverse rule (the first, hash-ordered entries of the gold's list, fixed
    across epochs): a fresh draw each time, falling back to a uniform entity for mentions whose
    list holds nothing but the gold.
    """

    name = "candidates"

    def __init__(self, candidate_lists: Sequence[Sequence[int]], num_entities: int):
        if num_entities < 2:
            raise ConfigError("negative sampling needs at least 2 entities in the KB")
        self.num_entities = int(num_entities)
        lens = np.array([len(c) for c in candidate_lists], dtype=np.int64)
        self._start = np.concatenate([[0], np.cumsum(lens)])
        self._flat = np.array([e for c in candidate_lists for e in c], dtype=np.int64)

    def sample(self, gold: np.ndarray, rng: np.random.Generator, rows: np.ndarray | None = None,
               k: int = 1) -> np.ndarray:
        """``[B]`` or ``[B, k]`` negatives for mention rows ``rows`` (indices into the lists)."""
        if rows is None:
            raise ValueError("the candidates sampler needs the mention rows")
        g = np.repeat(np.asarray(gold, dtype=np.int64)[:, None], k, axis=1).ravel()
        r = np.repeat(np.asarray(rows, dtype=np.int64)[:, None], k, axis=1).ravel()
        out = _uniform_other(g, self.num_entities, rng)
        todo = np.arange(g.shape[0])
        for _ in range(_MAX_REJECT_ROUNDS):
            a, b = self._start[r[todo]], self._start[r[todo] + 1]
            has = b > a
            todo = todo[has]
            if todo.size == 0:
                break
            a, b = a[has], b[has]
            pick = self._flat[a + np.floor(rng.random(todo.shape) * (b - a)).astype(np.int64)]
            ok = pick != g[todo]
            out[todo[ok]] = pick[ok]
            todo = todo[~ok]
        out = out.reshape(-1, k)
        return out[:, 0] if k == 1 else out
