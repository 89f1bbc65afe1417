"""Ranking evaluation under both protocols (notebook ``03_train``).

- ``dim``: DIM's own protocol (the released ``nel_model/metric_topk.py``): the gold is ranked among its mention's candidate list
  (top-100 fuzzy candidates) plus the gold itself; H@1/5/10/20 (the released ``top1..top20``).
- ``kb``: MIMIC's and later papers' protocol: the gold is ranked among every entity of
  the KB; H@1/3/5/10/20, MRR and mean rank (MR).

Scores are cosine similarities of the query and the entity features, as released (``--similarity cos``).

Rank rules:

- ``pessimistic`` (default): rank = 1 + the number of *other* candidates scoring at least as high
  as the gold, so a tie counts against the model; a NaN gold score ranks last (rank = number of
  candidates); NaN scores of other candidates never beat anything.
- ``strict``: the released rule, rank = 1 + the number of candidates scoring strictly higher. Ties
  favour the gold, and a NaN gold ranks first (a DWE log shows perfect scores beside a NaN loss).
  Use it only to compare with the released numbers.

Every metric is a fraction in [0, 1] (H@k, MRR) or a rank (MR); ``n`` is the number of mentions.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

RULES = ("pessimistic", "strict")
PROTOCOLS = ("dim", "kb")
DIM_KS = (1, 5, 10, 20)
KB_KS = (1, 3, 5, 10, 20)

#: One-line descriptions written into every metrics.json next to the numbers.
PROTOCOL_NOTES = {
    "dim": "DIM protocol: rank of the gold among its mention's candidate list plus the gold "
           "(gold guaranteed), cosine scores; H@1/5/10/20",
    "kb": "whole-KB protocol (MIMIC and later): rank of the gold among all KB entities, cosine "
          "scores; H@1/3/5/10/20, MRR, MR",
}


#: What each rank rule means, written into every metrics.json beside the numbers of both.
RULE_NOTES = {
    "strict": "released rule (nel_model/metric_topk.py): rank = 1 + candidates scoring strictly higher; "
              "ties and a NaN gold favour the model",
    "pessimistic": "rank = 1 + other candidates scoring at least as high; ties count against the model, "
                   "a NaN gold ranks last",
}


def check_rule(rule: str) -> str:
    """Validate a rank rule name."""
    if rule not in RULES:
        raise ConfigError(f"unknown rank rule {rule!r}; choose from {', '.join(RULES)}")
    return rule


def _count(scores: torch.Tensor, g: torch.Tensor, strict: bool, valid: torch.Tensor | None) -> torch.Tensor:
    """Per row, how many entries score ``> g`` (strict) or ``>= g``; NaN never counts."""
    if scores.device.type == "cpu":
        # numpy's compare + count_nonzero is about 10x faster than torch's bool sum on CPU
        s, gn = scores.detach().numpy(), g.detach().numpy()
        cmp = s > gn if strict else s >= gn
        if valid is not None:
            cmp &= valid.numpy()
        return torch.from_numpy(np.count_nonzero(cmp, axis=1).astype(np.int64))
    cmp = scores > g if strict else scores >= g
    if valid is not None:
        cmp &= valid
    return cmp.sum(1)


def gold_rank(scores: torch.Tensor, gold_col: torch.Tensor, rule: str = "pessimistic",
              valid: torch.Tensor | None = None) -> torch.Tensor:
    """Rank ``[B]`` (1 = best) of column ``gold_col`` in each row of ``scores [B, C]``.

    ``valid [B, C]`` marks real candidates (False = padding, never counted).
    """
    check_rule(rule)
    rows = torch.arange(scores.shape[0], device=scores.device)
    g = scores[rows, gold_col][:, None]  # [B, 1]
    if rule == "strict":
        return 1 + _count(scores, g, True, valid)
    nan = torch.isnan(g[:, 0])
    # the gold itself scores >= itself: it is not "another" candidate (a NaN gold never is)
    rank = _count(scores, g, False, valid) - (~nan).long() + 1
    worst = valid.sum(1) if valid is not None else torch.full_like(rank, scores.shape[1])
    return torch.where(nan, worst, rank)


def metrics_from_ranks(ranks: Sequence[int] | np.ndarray | torch.Tensor, ks: Iterable[int],
                       mrr: bool = True) -> dict:
    """H@k for each k (fraction of mentions with rank <= k), plus MRR and MR if asked."""
    r = torch.as_tensor(np.asarray(ranks), dtype=torch.float64)
    out: dict = {}
    n = int(r.numel())
    for k in ks:
        out[f"H@{k}"] = float((r <= k).double().mean()) if n else None
    if mrr:
        out["MRR"] = float((1.0 / r).mean()) if n else None
        out["MR"] = float(r.mean()) if n else None
    out["n"] = n
    return out


def candidate_matrix(candidates, mention_ids: Sequence[str], gold: Sequence[int],
                     entity_index: dict[str, int], limit: int | None = None,
                     source: str = "candidates.parquet") -> np.ndarray:
    """``[N, C]`` entity indices per mention: the gold in column 0, then its candidates, -1 padding.

    ``candidates`` is the ``(mention_id, qids)`` table; ``limit`` keeps the first ``limit`` listed
    candidates (WikiDiverse's released evaluation keeps 79 plus the gold). A candidate that is not
    in the KB, or a mention without a list, raises a DataError naming it.
    """
    lists = dict(zip(candidates["mention_id"].tolist(), candidates["qids"].tolist()))
    rows: list[list[int]] = []
    for mid, g in zip(mention_ids, gold):
        if mid not in lists:
            raise DataError("mention has no candidate list (run `dimkit candidates NAME`)",
                            file=source, record=mid, field="qids")
        qids = list(lists[mid])[:limit] if limit is not None else list(lists[mid])
        row, seen = [int(g)], {int(g)}
        for q in qids:
            e = entity_index.get(q)
            if e is None:
                raise DataError(f"candidate {q!r} is not in the knowledge base", file=source,
                                record=mid, field="qids")
            if e not in seen:  # the gold is ranked once, whether listed or not (as released)
                seen.add(e)
                row.append(e)
        rows.append(row)
    width = max((len(r) for r in rows), default=1)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation for cosine scores (NaN rows stay NaN)."""
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def _rules(rule: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(check_rule(r) for r in ((rule,) if isinstance(rule, str) else rule))


@torch.no_grad()
def dim_ranks(queries: torch.Tensor, entities: torch.Tensor, cand: np.ndarray | torch.Tensor,
              rule: str | Sequence[str] = "pessimistic", chunk: int = 1024):
    """Ranks under the DIM protocol; ``cand [N, C]`` from :func:`candidate_matrix` (gold in column 0).

    ``rule`` may name several rules: the scores are then computed once and ``{rule: ranks}`` returned.
    """
    rules = _rules(rule)
    qn, en = normalize(queries), normalize(entities)
    cand = torch.as_tensor(cand, device=qn.device)
    out: dict[str, list] = {r: [] for r in rules}
    for a in range(0, qn.shape[0], chunk):
        c = cand[a:a + chunk]
        valid = c >= 0
        ce = en[c.clamp_min(0)]  # [n, C, D]
        s = torch.einsum("nd,ncd->nc", qn[a:a + chunk], ce)
        zero = torch.zeros(c.shape[0], dtype=torch.long, device=qn.device)
        for r in rules:
            out[r].append(gold_rank(s, zero, r, valid))
    ranks = {r: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for r, v in out.items()}
    return ranks[rule] if isinstance(rule, str) else ranks


@torch.no_grad()
def kb_ranks(queries: torch.Tensor, entities: torch.Tensor, gold: np.ndarray | torch.Tensor,
             rule: str | Sequence[str] = "pessimistic", chunk: int | None = None, topk: int = 0):
    """Ranks among all KB entities, and the ``topk`` best entity indices per mention if asked.

    Mentions are scored in chunks so that one chunk's score matrix stays near 128 MB. ``rule`` may
    name several rules: each chunk is then scored once for all of them and ``{rule: ranks}`` returned.
    """
    rules = _rules(rule)
    qn, en = normalize(queries), normalize(entities)
    gold = torch.as_tensor(gold, dtype=torch.long, device=qn.device)
    if chunk is None:
        chunk = max(1, (32 * 1024 * 1024) // max(en.shape[0], 1))
    out: dict[str, list] = {r: [] for r in rules}
    tops = []
    for a in range(0, qn.shape[0], chunk):
        s = qn[a:a + chunk] @ en.T  # [n, E]
        for r in rules:
            out[r].append(gold_rank(s, gold[a:a + chunk], r))
        if topk:
            tops.append(torch.topk(s.nan_to_num(nan=-2.0), min(topk, s.shape[1]), dim=1).indices)
    ranks = {r: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for r, v in out.items()}
    return (ranks[rule] if isinstance(rule, str) else ranks), (torch.cat(tops) if tops else None)


def evaluate_rules(queries: torch.Tensor, entities: torch.Tensor, gold: np.ndarray, cand: np.ndarray | None,
                   rules: Sequence[str] = RULES, protocols: Sequence[str] = PROTOCOLS, topk: int = 0
                   ) -> tuple[dict, dict, torch.Tensor | None]:
    """Every protocol under every rule from one scoring pass per protocol.

    Returns ``({rule: {protocol: metrics}}, {rule: {protocol: ranks [N]}}, top)``, ``top [N, topk]``
    being the best KB entities per mention (``None`` unless ``topk`` and the 'kb' protocol are asked).
    """
    rules = _rules(rules)
    metrics: dict = {r: {} for r in rules}
    ranks: dict = {r: {} for r in rules}
    top = None
    for p in protocols:
        if p == "dim":
            if cand is None:
                raise ConfigError("the 'dim' protocol needs candidate lists (run `dimkit candidates NAME`)")
            by_rule, ks = dim_ranks(queries, entities, cand, rules), DIM_KS
        elif p == "kb":
            (by_rule, top), ks = kb_ranks(queries, entities, gold, rules, topk=topk), KB_KS
        else:
            raise ConfigError(f"unknown protocol {p!r}; choose from {', '.join(PROTOCOLS)}")
        for r, rk in by_rule.items():
            metrics[r][p] = metrics_from_ranks(rk.cpu(), ks)
            ranks[r][p] = rk.cpu().numpy()
    return metrics, ranks, top


def evaluate_queries(queries: torch.Tensor, entities: torch.Tensor, gold: np.ndarray,
                     cand: np.ndarray | None, rule: str = "pessimistic",
                     protocols: Sequence[str] = PROTOCOLS) -> tuple[dict, dict]:
    """Metrics of each protocol, and the per-mention ranks (``{"dim": [N], "kb": [N]}``), under one rule."""
    metrics, ranks, _ = evaluate_rules(queries, entities, gold, cand, (rule,), protocols)
    return metrics[rule], ranks[rule]


@torch.no_grad()
def encode(model: torch.nn.Module, inputs: dict[str, torch.Tensor], rows: np.ndarray | torch.Tensor,
           batch_size: int = 2048, attention: bool = False):
    """Queries ``[N, D]`` of mention rows ``rows`` (and attention weights if asked) in eval mode."""
    was_training = model.training
    model.eval()
    device = next(iter(inputs.values())).device
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    qs, ws = [], []
    for a in range(0, rows.shape[0], batch_size):
        idx = rows[a:a + batch_size]
        q, w = model({k: v[idx] for k, v in inputs.items()}, return_attention=True)
        qs.append(q)
        if attention and w is not None:
            ws.append(w)
    model.train(was_training)
    dim = model.cfg.dim
    q = torch.cat(qs) if qs else torch.zeros(0, dim, device=device)
    if attention:
        return q, (torch.cat(ws) if ws else None)
    return q
