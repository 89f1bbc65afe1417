"""The DIM mention encoder, two variants (notebook ``03_train``).

Both map the mention side (CLIP features of the mention, mention + sentence, image and expert cue)
into the frozen CLIP text space of the entity descriptions; entities never pass through a
trainable layer (the released ``neg_clip_extract.py::gen_gt_feats`` and ``nel_model/nel.py``).

``released`` -- what ``nel_model/nel.py::NELModel`` computes (docs/fidelity.md, row 1)::

    q = W_o Dropout(m + t + v + Dropout(LN(ReLU(W_c c + b_c)))) + b_o

with m, t, v, c the raw CLIP vectors of mention, mention + sentence, image and cue. The released
attention calls are dead code and are left out. A missing cue (WikiDiverse has none; the released
code crashes there) or an unusable image simply drops its term.

``paper`` -- what the paper describes: every modality is projected (``f`` for the text inputs,
``g`` for the image, shared or separate), plus a learned modality embedding; the projected mention
attends (multi-head, 8 heads) over the *sequence* of the other modalities, with a key padding
mask for an unusable image or a missing cue; a residual, LayerNorm and a linear layer map the
result into the entity space::

    K = V = [f(t) + e_t, g(v) + e_v, f(c) + e_c]          # [B, 3, H], masked where unusable
    a     = MHA(Q = f(m), K, V)                           # [B, H]; softmax weights over >1 keys
    q     = W_o Dropout(LN(f(m) + Dropout(a))) + b_o

With a single key the softmax weight is 1 and ``a`` would not depend on the query (docs/fidelity.md, row 2); with
several keys it does, which is what :func:`attention_depends_on_query` checks.

Ablations (both variants unless said): ``no_image``, ``no_cue``, ``text_only`` (mention +
sentence only), ``no_attention`` (``paper`` only: the attention is replaced by the plain mean of
the usable keys). ``original_descriptions`` changes the entity side and is handled by the trainer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .errors import ConfigError

VARIANTS = ("paper", "released")
#: Ablations; ``original_descriptions`` only swaps the entity features (see :mod:`dimkit.train`).
ABLATIONS = ("none", "no_image", "no_cue", "no_attention", "text_only", "original_descriptions")
#: The mention-side inputs a batch carries (``[B, D]`` each, plus ``image_ok``/``cue_ok`` ``[B]``).
INPUTS = ("mention", "mention_sentence", "image", "cue")


def parse_ablation(ablation: str | None) -> tuple[str, ...]:
    """Split ``"no_image,original_descriptions"`` into validated names (``()`` for none)."""
    if ablation is None:
        return ()
    parts = [a.strip() for a in str(ablation).replace("+", ",").split(",") if a.strip()]
    bad = [a for a in parts if a not in ABLATIONS]
    if bad:
        raise ConfigError(f"unknown ablation {bad[0]!r}; choose from {', '.join(ABLATIONS)} "
                          "(combine with commas)")
    return tuple(sorted({a for a in parts if a != "none"}))


@dataclass
class ModelConfig:
    """Sizes and switches of the mention encoder."""

    variant: str = "paper"
    dim: int = 512  # CLIP feature size (ViT-B/32: 512); also the entity space
    hidden: int = 512
    heads: int = 8
    dropout: float = 0.4
    use_image: bool = True
    use_cue: bool = True
    use_sentence: bool = True
    use_attention: bool = True
    separate_projections: bool = False  # paper variant: one projection per text input instead of a shared f

    @classmethod
    def from_ablation(cls, ablation: str | None, **kw) -> "ModelConfig":
        """A config with the switches of an ablation string applied."""
        cfg = cls(**kw)
        abl = parse_ablation(ablation)
        if cfg.variant not in VARIANTS:
            raise ConfigError(f"unknown variant {cfg.variant!r}; choose from {', '.join(VARIANTS)}")
        if "no_attention" in abl and cfg.variant == "released":
            raise ConfigError("ablation 'no_attention' does not apply to the 'released' variant: "
                              "it uses no attention (nel_model/nel.py::NELModel sums its inputs)")
        if "no_image" in abl or "text_only" in abl:
            cfg.use_image = False
        if "no_cue" in abl or "text_only" in abl:
            cfg.use_cue = False
        if "no_attention" in abl:
            cfg.use_attention = False
        return cfg


def _projection(d_in: int, hidden: int, dropout: float) -> nn.Sequential:
    """The released ``text_trans``: Linear -> ReLU -> LayerNorm -> Dropout."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.LayerNorm(hidden), nn.Dropout(dropout))


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform for every parameter with more than one dimension, as the released train.py."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class ReleasedModel(nn.Module):
    """The released ``nel_model/nel.py::NELModel.forward`` (docs/fidelity.md, row 1): a linear map of
    the sum of raw CLIP vectors plus one transformed cue vector."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden != cfg.dim:
            raise ConfigError(f"the released variant adds raw {cfg.dim}-d CLIP vectors to a projected "
                              f"cue, so hidden must equal the feature size ({cfg.dim}), got {cfg.hidden}")
        self.cfg = cfg
        self.text_trans = _projection(cfg.dim, cfg.hidden, cfg.dropout)
        self.out = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cfg.hidden, cfg.dim))
        init_weights(self)

    def forward(self, batch: dict[str, torch.Tensor], return_attention: bool = False):
        """``[B, D]`` queries in the entity space (attention weights: None, there are none)."""
        x = batch["mention"]
        if self.cfg.use_sentence:
            x = x + batch["mention_sentence"]
        if self.cfg.use_image:
            # unusable images are zero vectors already; the mask makes that explicit
            x = x + batch["image"] * batch["image_ok"][:, None].to(x.dtype)
        if self.cfg.use_cue:
            x = x + self.text_trans(batch["cue"]) * batch["cue_ok"][:, None].to(x.dtype)
        q = self.out(x)
        return (q, None) if return_attention else q


class PaperModel(nn.Module):
    """The paper's fusion: the projected mention attends over the other modalities (>1 keys)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden
        self.key_names = ["mention_sentence"] * cfg.use_sentence + ["image"] * cfg.use_image \
            + ["cue"] * cfg.use_cue
        if not self.key_names:
            raise ConfigError("the paper variant needs at least one input besides the mention")
        self.f = _projection(cfg.dim, h, cfg.dropout)  # shared text projection (released text_trans)
        self.g = _projection(cfg.dim, h, cfg.dropout)  # image projection (released img_trans)
        if cfg.separate_projections:
            self.f_sentence = _projection(cfg.dim, h, cfg.dropout)
            self.f_cue = _projection(cfg.dim, h, cfg.dropout)
        self.modality = nn.Parameter(torch.zeros(len(self.key_names), h))  # tells keys apart
        self.attn = nn.MultiheadAttention(h, cfg.heads, dropout=0.0, batch_first=True)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = nn.LayerNorm(h)
        self.out = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(h, cfg.dim))
        init_weights(self)
        nn.init.normal_(self.modality, std=0.02)

    def _project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "image":
            return self.g(x)
        if self.cfg.separate_projections and name == "mention_sentence":
            return self.f_sentence(x)
        if self.cfg.separate_projections and name == "cue":
            return self.f_cue(x)
        return self.f(x)

    def keys(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected key sequence ``[B, K, H]`` and key padding mask ``[B, K]`` (True = ignore)."""
        keys, masks = [], []
        for i, name in enumerate(self.key_names):
            keys.append(self._project(name, batch[name]) + self.modality[i])
            if name == "image":
                masks.append(~batch["image_ok"].bool())
            elif name == "cue":
                masks.append(~batch["cue_ok"].bool())
            else:
                masks.append(torch.zeros_like(batch["image_ok"], dtype=torch.bool))
        return torch.stack(keys, 1), torch.stack(masks, 1)

    def attend(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fuse: ``query [B, H]`` over ``keys [B, K, H]``; returns ``[B, H]`` and weights ``[B, heads, K]``."""
        # A row with every key masked (no sentence key, no image, no cue) would give NaN weights:
        # let it attend over its (uninformative) keys instead.
        mask = mask & ~mask.all(1, keepdim=True)
        if not self.cfg.use_attention:
            keep = (~mask).to(keys.dtype)[..., None]  # [B, K, 1]
            return (keys * keep).sum(1) / keep.sum(1).clamp_min(1.0), None
        out, w = self.attn(query[:, None, :], keys, keys, key_padding_mask=mask,
                           need_weights=True, average_attn_weights=False)
        return out[:, 0], w[:, :, 0, :]

    def forward(self, batch: dict[str, torch.Tensor], return_attention: bool = False):
        """``[B, D]`` queries; with ``return_attention`` also the weights ``[B, heads, K]``."""
        qm = self.f(batch["mention"])  # [B, H]
        keys, mask = self.keys(batch)  # [B, K, H], [B, K]
        a, w = self.attend(qm, keys, mask)
        q = self.out(self.norm(qm + self.drop(a)))
        return (q, w) if return_attention else q


def build_model(cfg: ModelConfig) -> nn.Module:
    """The mention encoder of ``cfg.variant``."""
    if cfg.variant == "released":
        return ReleasedModel(cfg)
    if cfg.variant == "paper":
        return PaperModel(cfg)
    raise ConfigError(f"unknown variant {cfg.variant!r}; choose from {', '.join(VARIANTS)}")


@torch.no_grad()
def attention_depends_on_query(model: PaperModel, batch: dict[str, torch.Tensor], key_count: int | None = None,
                               atol: float = 1e-6) -> bool:
    """True if the fused attention output changes when only the query changes (keys fixed).

    ``key_count`` keeps only the first k keys (1 shows the degenerate single-key case of the released attention calls).
    """
    model.eval()
    keys, mask = model.keys(batch)
    if key_count is not None:
        keys, mask = keys[:, :key_count], mask[:, :key_count]
    q1 = model.f(batch["mention"])
    q2 = model.f(batch["mention"].flip(0) * 3.0 + 1.0)
    a1, _ = model.attend(q1, keys, mask)
    a2, _ = model.attend(q2, keys, mask)
    return not torch.allclose(a1, a2, atol=atol)
