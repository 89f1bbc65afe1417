"""The optimiser of the released training script (notebook ``03_train``, ``--set optimizer=released``).

The released ``nel_model/train.py::train`` builds its optimiser as::

    no_decay = ["bias", "LayerNorm.weight"]
    groups = [{"params": <parameters whose name contains none of no_decay>, "weight_decay": wd},
              {"params": <the others>, "weight_decay": 0.0}]
    AdamW(groups, lr=lr, eps=1e-8)          # transformers' AdamW (4.x), not torch's

Two things differ from dimkit's default (``torch.optim.AdamW`` over the groups of
``dimkit.train._param_groups``):

1. **Update rule.** transformers 4.x ``AdamW`` (``transformers.optimization.AdamW``, removed in
   transformers 5) adds epsilon to the square root of the second moment *before* the bias
   correction, and applies the decoupled weight decay *after* the Adam step, to the weights the
   step has just changed. ``torch.optim.AdamW`` adds epsilon after the bias correction and decays
   the weights before the step. For one parameter at step t (g the gradient, lr the scheduled
   learning rate)::

       m = b1 m + (1 - b1) g                v = b2 v + (1 - b2) g^2
       released:  p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps);   p -= lr wd p
       torch:     p -= lr wd p;   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

   With ``eps = 0`` and ``wd = 0`` the two coincide; otherwise the released epsilon acts like
   ``eps / sqrt(1 - b2^t)`` of torch's (about 32x larger at the first step) and the decay differs
   by ``lr * wd`` times the step. :class:`ReleasedAdamW` is that update, written here because
   current transformers no longer ships it.
2. **Groups.** The no-decay rule matches parameter *names*. dimkit's models keep their LayerNorms
   inside ``nn.Sequential`` (``text_trans.2.weight``) or under another attribute name
   (``norm.weight``), so the string ``"LayerNorm.weight"`` matches nothing and the LayerNorm
   weights are decayed; only biases are exempt. :func:`released_param_groups` applies the rule as
   written; dimkit's own groups exempt every LayerNorm parameter, as the rule intends.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

#: Optimiser choices of the trainer: ``released`` = :class:`ReleasedAdamW` over
#: :func:`released_param_groups`; ``torch`` = ``torch.optim.AdamW`` over dimkit's groups.
OPTIMIZERS = ("released", "torch")

#: The released no-decay name fragments (``nel_model/train.py::train``).
NO_DECAY = ("bias", "LayerNorm.weight")


def released_no_decay(name: str) -> bool:
    """True if the released rule exempts the parameter called ``name`` from weight decay."""
    return any(fragment in name for fragment in NO_DECAY)


def released_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The released parameter groups: decay for every name without ``bias`` / ``LayerNorm.weight``.

    Returns ``[{"params": decayed, "weight_decay": weight_decay}, {"params": exempt,
    "weight_decay": 0.0}]`` (the layout of ``dimkit.train._param_groups``). On dimkit's models the
    LayerNorm weights (``text_trans.2.weight``, ``norm.weight``) land in the decayed group.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if released_no_decay(name) else decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)},
            {"params": no_decay, "weight_decay": 0.0}]


class ReleasedAdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay as transformers 4.x ``AdamW`` computes it.

    Per parameter with a gradient, at step t (counted per parameter)::

        exp_avg    = b1 * exp_avg + (1 - b1) * g
        exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * g * g
        denom      = sqrt(exp_avg_sq) + eps                       # eps before the bias correction
        step_size  = lr * sqrt(1 - b2^t) / (1 - b1^t)             # lr alone if not correct_bias
        p         -= step_size * exp_avg / denom
        p         -= lr * weight_decay * p                        # if weight_decay > 0, after the step

    Defaults are those of the transformers class (``eps`` 1e-6); the released script passes
    ``eps=1e-8`` (its ``--adam_epsilon``). Parameters without a gradient are skipped and keep no
    state (the released optimiser holds an unused BERT that way). Sparse gradients are refused.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon {eps}: must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight decay {weight_decay}: must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        correct_bias=correct_bias)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One update of every parameter that has a gradient; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("ReleasedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(eps)
                step_size = lr
                if group["correct_bias"]:
                    step_size = lr * math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if wd > 0.0:
                    p.add_(p, alpha=-lr * wd)
        return loss
