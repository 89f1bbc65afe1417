"""Training losses of DIM (notebook ``03_train``): the released N-pair loss and textbook in-batch ones.

- :func:`npair_loss` is the released ``nel_model/triplet_loss.py::NpairLoss``: dot
  products, one sampled hard negative per sample, and a broadcast that makes every anchor see the
  negatives of *all* samples of the batch (its own included), plus an L2 term on anchors and
  positives (``l2_reg`` 0.02)::

      L = 1/B sum_i log(1 + sum_j exp(q_i.n_j - q_i.p_i)) + l2_reg/B sum_i (|q_i|^2 + |p_i|^2)

- :func:`inbatch_npair_loss` is the textbook N-pair loss (Sohn, 2016): the other samples'
  positives are the negatives, i.e. a cross-entropy over ``q @ p.T`` with the diagonal as target.
  With ``temperature`` set it is InfoNCE on cosine similarities (CLIP's loss, one direction).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import ConfigError

#: Loss names accepted by :class:`dimkit.train.TrainConfig` (``loss``).
LOSSES = ("npair", "inbatch", "infonce")


def l2_term(anchors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Released L2 regulariser: mean over the batch of ``|q|^2 + |p|^2``."""
    return (anchors.pow(2).sum(-1) + positives.pow(2).sum(-1)).mean()


def npair_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
               l2_reg: float = 0.02) -> torch.Tensor:
    """The released N-pair loss (``nel_model/triplet_loss.py::NpairLoss``).

    Args:
        anchors: ``[B, D]`` mention queries q.
        positives: ``[B, D]`` gold entity features p.
        negatives: ``[B, D]`` one sampled negative per sample, shared across the batch as in the
            released code (each anchor sees all B negatives), or ``[B, K, D]`` for K negatives per
            sample, which (as the released broadcast does for K > 1) each anchor sees alone.
        l2_reg: weight of :func:`l2_term`.
    """
    if anchors.dim() != 2 or positives.shape != anchors.shape:
        raise ValueError(f"anchors and positives must both be [B, D], got {tuple(anchors.shape)} "
                         f"and {tuple(positives.shape)}")
    pos = (anchors * positives).sum(-1, keepdim=True)  # [B, 1]
    if negatives.dim() == 2:
        neg = anchors @ negatives.T  # [B, B]: q_i . n_j for every j of the batch
    elif negatives.dim() == 3:
        neg = torch.einsum("bd,bkd->bk", anchors, negatives)  # [B, K]
    else:
        raise ValueError(f"negatives must be [B, D] or [B, K, D], got {tuple(negatives.shape)}")
    diff = neg - pos  # q_i.(n_j - p_i)
    # log(1 + sum_j exp(x_j)) computed as logsumexp over [0, x_1..x_n]: no overflow for large dots.
    zeros = torch.zeros_like(diff[:, :1])
    loss = torch.logsumexp(torch.cat([zeros, diff], dim=1), dim=1).mean()
    return loss + l2_reg * l2_term(anchors, positives)


def inbatch_npair_loss(anchors: torch.Tensor, positives: torch.Tensor,
                       negatives: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                       temperature: float | None = None, l2_reg: float = 0.0) -> torch.Tensor:
    """Textbook in-batch N-pair loss; InfoNCE on cosine similarities when ``temperature`` is set.

    Args:
        anchors: ``[B, D]`` queries; positives: ``[B, D]`` gold entity features.
        negatives: optional ``[B, D]`` or ``[B, K, D]`` sampled negatives, appended as extra
            columns for every anchor.
        labels: optional ``[B]`` gold entity ids: another sample's positive (or a negative) equal to
            an anchor's own gold is masked out instead of being pushed away.
        temperature: None = raw dot products (N-pair); a float = cosine / temperature (InfoNCE).
        l2_reg: optional weight of :func:`l2_term` (0 by default, unlike the released loss).
    """
    q, p = anchors, positives
    n = negatives
    if temperature is not None:
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        q = F.normalize(q, dim=-1) / temperature
        p = F.normalize(p, dim=-1)
        n = F.normalize(n, dim=-1) if n is not None else None
    # With several samples of the same gold in one batch the other positives are not negatives.
    logits = q @ p.T  # [B, B]
    if labels is not None:
        same = labels[:, None] == labels[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    if n is not None:
        # Every anchor sees every sampled negative of the batch; samplers already reject the gold.
        logits = torch.cat([logits, q @ n.reshape(-1, n.shape[-1]).T], dim=1)  # [B, B + B*K]
    target = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, target)
    if l2_reg:
        loss = loss + l2_reg * l2_term(anchors, positives)
    return loss


def compute_loss(name: str, anchors: torch.Tensor, positives: torch.Tensor,
                 negatives: torch.Tensor | None, labels: torch.Tensor | None = None, *,
                 l2_reg: float = 0.02, temperature: float = 0.07) -> torch.Tensor:
    """Dispatch on a loss name of :data:`LOSSES` (what the training loop calls)."""
    if name == "npair":
        if negatives is None:
            raise ConfigError("loss 'npair' (the released one) needs sampled negatives")
        return npair_loss(anchors, positives, negatives, l2_reg=l2_reg)
    if name == "inbatch":
        return inbatch_npair_loss(anchors, positives, negatives, labels, None, l2_reg)
    if name == "infonce":
        return inbatch_npair_loss(anchors, positives, negatives, labels, temperature, 0.0)
    raise ConfigError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
