"""Synthetic MEL problems in memory, for tests and benchmarks of the trainer (no files, no CLIP).

:func:`make_problem` builds a prepared :class:`dimkit.datasets.Dataset` and a matching feature set
(the fields of ``dimkit.features.FeatureSet``) where entity names are ambiguous (``group_size``
entities share each name) and the image -- and, for some mentions, the cue -- determines which of
them is meant. Text alone can only guess within a name group, so a model that uses the image must
beat the text-only ablation.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dimkit.datasets import Dataset


@dataclass
class SyntheticFeatures:
    """The fields of ``dimkit.features.FeatureSet`` (float32 arrays, raw, not normalised)."""

    model_id: str
    weights_real: bool
    dim: int
    mention_ids: list
    entity_qids: list
    mention: np.ndarray
    mention_sentence: np.ndarray
    image: np.ndarray
    image_ok: np.ndarray
    cue: np.ndarray
    cue_ok: np.ndarray
    entity: np.ndarray
    entity_original: np.ndarray | None = None


_WORDS = ("river", "castle", "guitar", "senator", "painter", "bridge", "novel", "striker", "island", "opera",
          "tower", "comet", "harbor", "temple", "violin", "glacier", "pilot", "chemist", "forest", "theatre")


def make_problem(n_mentions: int = 600, n_groups: int = 20, group_size: int = 3, dim: int = 32,
                 n_candidates: int = 20, image_missing: float = 0.1, cue_present: float = 0.7,
                 noise: float = 0.3, seed: int = 0, name: str = "synthetic",
                 root: str | Path = "/nonexistent/synthetic", splits: tuple[float, float] = (0.7, 0.15),
                 with_text: bool = True) -> tuple[Dataset, SyntheticFeatures]:
    """A dataset + features where the image (and cue) disambiguate entities sharing a name."""
    rng = np.random.default_rng(seed)
    n_ent = n_groups * group_size
    scale = 3.0  # raw CLIP vectors are not unit length; keep that property
    ent = rng.normal(size=(n_ent, dim)).astype(np.float32) * scale / np.sqrt(dim) * 3
    name_vec = rng.normal(size=(n_groups, dim)).astype(np.float32)
    rot_img = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    rot_cue = np.linalg.qr(rng.normal(size=(dim, dim)))[0].astype(np.float32)
    group_of = np.arange(n_ent) // group_size
    # the text side knows the name (group) of the gold, and its mean entity direction
    group_mean = np.stack([ent[group_of == g].mean(0) for g in range(n_groups)])

    gold = rng.integers(0, n_ent, size=n_mentions)
    g = group_of[gold]

    def nz(*shape):
        return rng.normal(size=shape).astype(np.float32) * noise * scale / np.sqrt(dim) * 3

    mention = name_vec[g] + group_mean[g] + nz(n_mentions, dim)
    sentence = mention + rng.normal(size=(n_mentions, dim)).astype(np.float32) * 0.5 + nz(n_mentions, dim)
    image = ent[gold] @ rot_img + nz(n_mentions, dim)
    image_ok = rng.random(n_mentions) >= image_missing
    image[~image_ok] = 0.0
    cue = ent[gold] @ rot_cue + nz(n_mentions, dim)
    cue_ok = rng.random(n_mentions) < cue_present
    cue[~cue_ok] = 0.0
    ent_original = ent + nz(n_ent, dim) * 2  # "original" descriptions: a noisier view of the same entity

    n_tr = int(splits[0] * n_mentions)
    n_dv = int(splits[1] * n_mentions)
    split = np.array(["train"] * n_tr + ["dev"] * n_dv + ["test"] * (n_mentions - n_tr - n_dv))
    qids = [f"Q{100 + i}" for i in range(n_ent)]
    mids = [f"m{i:05d}" for i in range(n_mentions)]
    names = [f"Name{grp}" for grp in group_of]
    if with_text:
        descs = [" ".join(rng.choice(_WORDS, size=6)) + f" {names[i]} item{i}" for i in range(n_ent)]
    else:
        descs = [f"entity {i}" for i in range(n_ent)]
    mentions = pd.DataFrame({
        "mention_id": mids, "split": split, "sentence": [f"A sentence about {names[q]}." for q in gold],
        "mention": [names[q] for q in gold],
        "image": [f"img/{m}.jpg" if ok else None for m, ok in zip(mids, image_ok)],
        "qid": [qids[q] for q in gold]})
    entities = pd.DataFrame({"qid": qids, "name": names, "description": descs,
                             "description_source": "synthetic", "images": [[] for _ in qids],
                             "description_original": [d.split(" item")[0] for d in descs]})
    cand = []
    for q in gold:
        same = [qids[e] for e in np.flatnonzero(group_of == group_of[q])]
        others = rng.choice(n_ent, size=min(n_candidates, n_ent), replace=False)
        lst = list(dict.fromkeys(same + [qids[e] for e in others]))[:n_candidates]
        cand.append(lst)
    candidates = pd.DataFrame({"mention_id": mids, "qids": cand})
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    mention, sentence, image, cue, ent = map(f32, (mention, sentence, image, cue, ent))
    ds = Dataset(name=name, root=Path(root), mentions=mentions, entities=entities,
                 meta={"source": "synthetic"}, _candidates=candidates)
    feats = SyntheticFeatures(model_id="synthetic", weights_real=False, dim=dim, mention_ids=mids,
                              entity_qids=qids, mention=mention, mention_sentence=sentence, image=image,
                              image_ok=image_ok, cue=cue, cue_ok=cue_ok, entity=ent,
                              entity_original=ent_original.astype(np.float32))
    return ds, feats
