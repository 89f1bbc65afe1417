"""Negative entities for training (notebook ``03_train``): the released TF-IDF sampler and simpler ones.

The released code (``nel_model/dataset.py::neg_sample_online`` with the tables of
``data_process/*/sample_util.py``, spec 2.5) draws one "hard" negative per sample each time the
sample is loaded:

1. with probability 0.95 (and if the gold entity has any weighted token) pick a token of the gold
   entity's fact text with probability proportional to ``int(100 * tfidf)``, then an entity
   containing that token with probability proportional to the token's count in it;
2. otherwise (or if the gold has no weighted token) a uniformly random entity;
3. a draw equal to the gold is rejected and drawn again.

:class:`TfidfNegativeSampler` computes the same tables without NLTK or gensim:

- *Tokens*: NLTK's ``word_tokenize`` is replaced by a regular expression that keeps runs of word
  characters (with inner ``'`` or ``-``) and single punctuation marks as tokens; like the released
  code, case is kept and the same stop list (punctuation, "Sex", "Name", "Nick", "Occupation",
  "Birth", "Languages", "Religion", "Alma", "mater") is removed. Contractions split differently
  from NLTK ("don't" stays one token), which changes a few rare tokens, not the method.
- *TF-IDF*: gensim's ``TfidfModel`` defaults: raw term count times ``log2(N / df)``, L2-normalised
  per entity; terms in every entity get weight 0 and drop out.
- *Fact text*: ``"<name> [SEP]. <description or None>"`` as in ``build_text.py``.

The tables are kept as cumulative weights rather than the released repeated-id lists, which gives
the same distribution in a fraction of the memory and samples a whole batch with numpy at once.
After 10 rejected rounds the remaining draws fall back to a uniform non-gold entity (the released
loop would spin forever on an entity whose tokens occur nowhere else).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

from .errors import ConfigError

#: Sampler names accepted by :class:`dimkit.train.TrainConfig` (``negatives``).
SAMPLERS = ("tfidf", "random", "candidates")

#: The released stop list (``sample_util.py``): punctuation plus attribute labels of the fact texts.
STOP_TOKENS = frozenset(list(string.punctuation) + [
    "Sex", "Name", "Nick", "Occupation", "Birth", "Languages", "Religion", "Alma", "mater"])

_TOKEN_RE = re.compile(r"\w+(?:['\-]\w+)*|[^\w\s]")
_MAX_REJECT_ROUNDS = 10


def tokenize(text: str) -> list[str]:
    """Split text into word and punctuation tokens (a plain stand-in for NLTK's word_tokenize)."""
    return _TOKEN_RE.findall(text or "")


def fact_text(name: str, description: str | None) -> str:
    """The released entity fact text: ``"<name> [SEP]. <description or None>"``."""
    return f"{name} [SEP]. {description if description else 'None'}"


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


class TfidfNegativeSampler:
    """The released TF-IDF "hard" negative sampler (see the module docstring for what differs)."""

    name = "tfidf"

    def __init__(self, texts: Sequence[str], hard_prob: float = 0.95):
        self.num_entities = len(texts)
        if self.num_entities < 2:
            raise ConfigError("negative sampling needs at least 2 entities in the KB")
        self.hard_prob = float(hard_prob)
        vocab: dict[str, int] = {}
        counts: list[Counter] = []
        for text in texts:
            c = Counter(t for t in tokenize(text) if t not in STOP_TOKENS)
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
                      hard_prob: float = 0.95) -> "TfidfNegativeSampler":
        """Build from KB names and descriptions through the released fact text."""
        return cls([fact_text(n, d) for n, d in zip(names, descriptions)], hard_prob=hard_prob)

    def token_weights(self, entity: int) -> dict[str, int]:
        """The ``int(100 * tfidf)`` weight of each token of one entity (for inspection and tests)."""
        inv = {i: t for t, i in self.vocab.items()}
        a, b = self._ent_start[entity], self._ent_start[entity + 1]
        cum = self._ent_cum[a:b]
        prev = np.concatenate([[self._ent_cum[a - 1] if a > 0 else 0], cum[:-1]])
        return {inv[int(t)]: int(w) for t, w in zip(self._ent_tok[a:b], cum - prev)}

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
        for _ in range(_MAX_REJECT_ROUNDS):
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
