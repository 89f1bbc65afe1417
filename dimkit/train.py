"""Train and evaluate DIM (notebook ``03_train``; ``dimkit train NAME``).

``run(cfg) -> RunResult`` trains the mention encoder of :mod:`dimkit.model` on the frozen CLIP
features of :func:`dimkit.features.load_features`, with the released N-pair loss and TF-IDF hard
negatives by default, linear warm-up then linear decay to 0 and gradient clipping, as the released
``nel_model/train.py``.

The training *procedure* has four switches (:data:`RELEASED_PROCEDURE`, docs/fidelity.md rows 12-15):
``optimizer`` (``released``: transformers 4.x AdamW and the released parameter groups; ``torch``),
``patience`` (0 = every epoch, as released), ``stop_list`` (the TF-IDF tokens removed) and
``seeding`` (``released``: ``set_seed`` and the negatives' Python ``random`` stream). ``--variant
released`` takes the released value of each unless it is set; ``paper`` runs keep dimkit's choices.
``metrics.json`` names the value of each (``procedure``).

What dimkit adds to the released loop:

- evaluation every ``eval_steps`` optimizer steps on dev under both protocols of
  :mod:`dimkit.evaluate`; the best dev score (``select_protocol`` H@1) picks the model, whose dev and
  test metrics are reported separately, under both rank rules (``metrics_by_rule``);
- a checkpoint at each evaluation, written atomically and loaded with ``weights_only=True``,
  holding every RNG state (torch, CUDA, the shuffling generator, the negatives' stream) and the
  position inside the epoch, so ``resume=True`` ends with exactly the metrics of an uninterrupted run
  with the same seed (on the same device);
- a non-finite loss or gradient norm stops the run (:class:`TrainingDiverged`) and keeps the last
  good checkpoint;
- ``runs/<run-name>/metrics.json`` (results are data), ``predictions.parquet`` (per-mention ranks and
  the top-5 KB entities) and ``model.pt`` (the selected weights).

Presets (:data:`PRESETS`) copy the released scripts (``script/*.sh``); every key can be overridden and an
unknown key raises :class:`dimkit.errors.ConfigError`. The run name defaults to
``<dataset>-<variant>-<ablation>-s<seed>-<hash of the config>``, so a rerun with the same config
finds its folder (and, with ``resume``, its checkpoint), and a changed config gets a new one.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import atomic, datasets, paths
from .errors import ConfigError, DataError, DimkitError, option
from .stage import Config, Result, setting
from .evaluate import PROTOCOL_NOTES, PROTOCOLS, RULE_NOTES, RULES, candidate_matrix, encode, evaluate_queries, kb_ranks
from .losses import LOSSES, compute_loss
from .model import ABLATIONS, VARIANTS, ModelConfig, build_model, parse_ablation
from .negatives import (SAMPLERS, STOP_LISTS, CandidateNegativeSampler, RandomNegativeSampler,
                        ReleasedTfidfSampler, TfidfNegativeSampler)
from .optim import OPTIMIZERS, ReleasedAdamW, released_param_groups

CHECKPOINT_FORMAT = 1
#: Bump when a change to the model, loss, sampler or loop changes results: older checkpoints of
#: the same config are then trained again instead of resumed.
CODE_VERSION = 2
NOT_COMPARABLE = "not comparable to the paper"


class TrainingDiverged(DimkitError):
    """The loss (or the gradient norm) became NaN or infinite; the last good checkpoint is kept."""


#: How the weights are seeded and negatives drawn: ``released`` = ``nel_model/train.py::set_seed`` and
#: ``dataset.py::neg_sample_online``'s Python ``random`` stream; ``dimkit`` = separate numpy/torch generators.
SEEDINGS = ("released", "dimkit")


@dataclass
class TrainConfig(Config):
    """Everything a training run depends on (defaults = the released WikiMEL script, ``script/wwiki.sh``)."""

    STAGE: ClassVar[str] = "train"

    dataset: str = setting("sample+", "dataset name (sample+, wiki+, rich+, diverse+, wikimel, ...)", positional=True)
    variant: str = setting("paper", "paper (attention fusion) or released (the released model and procedure)",
                           choices=VARIANTS)
    ablation: str = setting("none", f"one of {', '.join(ABLATIONS)}, or several joined by commas")
    clip: str = setting("auto", "feature model for dimkit.features (auto: the sample CLIP on the sample, "
                                "ViT-B-32 elsewhere)")
    loss: str = setting("npair", "npair (released NpairLoss), inbatch (textbook N-pair) or infonce", choices=LOSSES)
    l2_reg: float = setting(0.02, "weight of the released L2 term", min=0, cli=False)
    temperature: float = setting(0.07, "infonce only", above=0, cli=False)
    negatives: str = setting("tfidf", "tfidf (released), random or candidates", choices=SAMPLERS)
    num_negatives: int = setting(1, "sampled negatives per sample (inbatch/infonce add them to the batch's)",
                                 min=0, cli=False)
    hard_prob: float = setting(0.95, "tfidf: probability of a TF-IDF draw instead of a uniform one", min=0,
                               cli=False)
    lr: float = setting(5e-5, "learning rate", above=0)
    optimizer: str = setting("torch", "released (transformers 4.x AdamW, released groups) or torch",
                             choices=OPTIMIZERS, cli=False)
    stop_list: str = setting("dimkit", "TF-IDF tokens removed: released (sample_util.py) or dimkit "
                                       "(all punctuation)", choices=tuple(STOP_LISTS), cli=False)
    seeding: str = setting("dimkit", "released (set_seed; negatives from Python's random) or dimkit",
                           choices=SEEDINGS, cli=False)
    weight_decay: float = setting(1e-3, "AdamW weight decay", min=0, cli=False)
    adam_epsilon: float = setting(1e-8, "AdamW epsilon", min=0, cli=False)
    max_grad_norm: float = setting(1.0, "gradient clipping", min=0, cli=False)
    warmup_steps: int = setting(100, "linear warm-up steps", min=0, cli=False)
    dropout: float = setting(0.4, "dropout", min=0, cli=False)
    hidden: int | None = setting(None, "hidden size (None: the CLIP feature size, 512 with ViT-B/32)", above=0,
                                 cli=False)
    heads: int = setting(8, "attention heads", above=0, cli=False)
    separate_projections: bool = setting(False, "paper variant: one projection per text input", cli=False)
    batch_size: int = setting(64, "batch size", above=0)
    num_epochs: int = setting(300, "epochs", above=0, cli="--epochs")
    eval_steps: int = setting(500, "evaluate and checkpoint every this many steps (0: every epoch)", min=0,
                              cli=False)
    patience: int = setting(20, "evaluations without a better dev score before stopping (0: never)", min=0,
                            cli=False)
    protocols: str = setting("dim,kb", "evaluation protocols, comma-joined (dim, kb)", cli=False)
    select_protocol: str = setting("dim", "model selection on dev H@1 of this protocol", choices=PROTOCOLS,
                                   cli=False)
    rank_rule: str = setting("pessimistic", "the rule of `metrics` (both are always kept): pessimistic or "
                                            "strict (released)", choices=RULES)
    candidate_limit: int | None = setting(None, "keep the first k listed candidates (WikiDiverse: 79 + gold)",
                                          min=1, cli=False)
    seed: int = setting(114514, "seed (the released scripts' 114514)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    num_threads: int | None = setting(None, "CPU threads for torch during the run (None: torch's default)",
                                      above=0, cli=False)
    run_name: str | None = setting(None, "run folder name (default: from the settings)")
    resume: bool = setting(True, "reuse the run's checkpoint: a finished run is read back, an interrupted one "
                                 "continues (--no-resume trains it again from the start)")
    allow_missing_inputs: bool = setting(False, "train the paper variant even when most images or cues are "
                                                "missing", cli=False)

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> "TrainConfig":
        """The dataset's preset (from the released scripts) with ``overrides`` (None keeps the preset).

        ``variant="released"`` also takes the released training procedure (:data:`RELEASED_PROCEDURE`)
        for every key not given. To set a field that accepts None (``candidate_limit``) to None, use
        :meth:`replace` afterwards, as ``--set candidate_limit=none`` does.
        """
        if (overrides.get("variant") or cls.variant) == "released":
            overrides = {**RELEASED_PROCEDURE, **{k: v for k, v in overrides.items() if v is not None}}
        return super().for_dataset(dataset, **overrides)

    def check(self) -> None:
        """Cross-field checks (names of ablations and protocols, sizes that must agree)."""
        self.dataset = datasets.canonical_name(self.dataset)
        self.ablation = ",".join(parse_ablation(self.ablation)) or "none"
        protos = [p.strip() for p in self.protocols.split(",") if p.strip()]
        bad = [p for p in protos if p not in PROTOCOLS]
        if bad or not protos:
            raise ConfigError(f"protocols={self.protocols!r}: use a comma list of {', '.join(PROTOCOLS)}")
        if self.select_protocol not in protos:
            raise ConfigError(f"select_protocol={self.select_protocol!r} is not among protocols={self.protocols!r}")
        self.protocols = ",".join(protos)
        if self.loss == "npair" and self.num_negatives < 1:
            raise ConfigError("the released N-pair loss needs num_negatives >= 1")
        if not self.dropout < 1.0 or not self.hard_prob <= 1.0:
            raise ConfigError("dropout must be in [0, 1) and hard_prob in [0, 1]")
        if self.hidden is not None and self.hidden % self.heads:
            raise ConfigError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.run_name is not None and (not self.run_name or "/" in self.run_name or self.run_name.startswith(".")):
            raise ConfigError(f"run_name {self.run_name!r} must be a plain folder name")
        ModelConfig.from_ablation(self.ablation, variant=self.variant)  # variant/ablation clash

    def fingerprint(self) -> str:
        """Short hash of what changes the result (not device, run name or resume)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def name(self) -> str:
        """The run folder name."""
        if self.run_name:
            return self.run_name
        abl = self.ablation.replace(",", "+") if self.ablation != "none" else "full"
        return f"{self.dataset}-{self.variant}-{abl}-s{self.seed}-{self.fingerprint()}"


_NOT_IN_FINGERPRINT = ("device", "run_name", "resume", "num_threads", "allow_missing_inputs")
_SHARED = dict(weight_decay=1e-3, dropout=0.4, hidden=None, heads=8, seed=114514, warmup_steps=100,
               eval_steps=500, patience=20, num_threads=None)
#: Per-dataset presets (keyed by the base dataset name); all have the same keys.
PRESETS: dict[str, dict[str, Any]] = {
    # script/wwiki.sh, script/rich.sh
    "wikimel": dict(_SHARED, lr=5e-5, batch_size=64, num_epochs=300, negatives="tfidf", candidate_limit=None),
    "richpediamel": dict(_SHARED, lr=5e-5, batch_size=64, num_epochs=300, negatives="tfidf",
                         candidate_limit=None),
    # script/diverse.sh; released negatives come from the gold's candidate list, evaluation keeps
    # the gold plus 79 candidates
    "wikidiverse": dict(_SHARED, lr=5e-6, batch_size=128, num_epochs=500, negatives="candidates",
                        candidate_limit=79),
    # the bundled synthetic sample: a few hundred mentions, so a larger lr, evaluation every epoch
    # and a short schedule that runs in about a minute on 2 CPU cores; its 64-d model is too small
    # for threads to help, and on a shared machine a second thread makes each step 2-3x slower
    "sample": dict(_SHARED, lr=1e-3, batch_size=32, num_epochs=30, negatives="tfidf",
                   candidate_limit=None, warmup_steps=20, eval_steps=0, patience=0, num_threads=1),
}


#: How the weights are seeded and negatives drawn: ``released`` = ``nel_model/train.py::set_seed`` and
#: ``dataset.py::neg_sample_online``'s Python ``random`` stream; ``dimkit`` = separate numpy/torch generators.
PRESETS["default"] = PRESETS["wikimel"]  # any other dataset: the WikiMEL script
TrainConfig.PRESETS = PRESETS

SEEDINGS = ("released", "dimkit")
#: The released training procedure (``nel_model/train.py``, ``sample_util.py``): what ``--variant
#: released`` trains with unless a key is set explicitly. ``paper`` runs keep the preset's values
#: (dimkit's choices, listed in :data:`DIMKIT_PROCEDURE`). docs/fidelity.md says what each changes.
RELEASED_PROCEDURE: dict[str, Any] = dict(optimizer="released", patience=0, stop_list="released",
                                          seeding="released")
DIMKIT_PROCEDURE: dict[str, str] = {
    "optimizer": "torch: torch.optim.AdamW, every bias and LayerNorm parameter exempt from weight decay",
    "patience": "early stopping after this many evaluations without a better dev score",
    "stop_list": "dimkit: all of string.punctuation removed from the TF-IDF tokens",
    "seeding": "dimkit: separate numpy and torch generators, every state in the checkpoint",
}


def procedure(cfg: "TrainConfig") -> dict:
    """Each training-procedure switch of ``cfg``: its value and whether it is the released one."""
    out = {}
    for key, released in RELEASED_PROCEDURE.items():
        value = getattr(cfg, key)
        same = value == released
        out[key] = {"value": value, "released": same,
                    "what": ("as released" if same else DIMKIT_PROCEDURE[key])}
    return out


# --------------------------------------------------------------------------------------------
# results


@dataclass
class RunResult(Result):
    """What a run returns and writes to ``metrics.json``."""

    run_name: str
    run_dir: Path
    dataset: str
    variant: str
    ablation: str
    config: dict
    metrics: dict  # {"dev": {"dim": {...}, "kb": {...}}, "test": {...}}
    best: dict  # step, epoch, dev score of the selected checkpoint
    curve: dict  # {"train": [{epoch, step, loss}], "dev": [{epoch, step, loss, dim: {...}, kb: {...}}]}
    status: str  # completed | early_stopped
    wall_time_s: float
    feature_model: str
    weights_real: bool
    note: str = ""
    counts: dict = field(default_factory=dict)
    inputs_missing: dict = field(default_factory=dict)  # {"image": {"share", "cause"}, ...}; empty when fine
    metrics_by_rule: dict = field(default_factory=dict)  # {"strict": <metrics>, "pessimistic": <metrics>}

    @property
    def metrics_path(self) -> Path:
        """``runs/<run-name>/metrics.json``."""
        return self.run_dir / "metrics.json"

    def row(self) -> dict:
        """One flat table row: names and the test (and dev) metrics of every protocol."""
        out = {"dataset": self.dataset, "variant": self.variant, "ablation": self.ablation}
        for split in ("test", "dev"):
            for proto, ms in self.metrics.get(split, {}).items():
                for k, v in ms.items():
                    if k != "n":
                        out[f"{split} {proto} {k}"] = v
        out["best epoch"] = self.best.get("epoch")
        out["status"] = self.status
        return out

    def __str__(self) -> str:
        t = self.metrics.get("test", {})
        parts = [f"{p} H@1 {m['H@1']:.3f}" for p, m in t.items() if m.get("H@1") is not None]
        return (f"{self.run_name}: test {', '.join(parts)} (best epoch {self.best.get('epoch')}, "
                f"{self.status}, {self.wall_time_s:.0f} s){'; ' + self.note if self.note else ''}")

    def summary(self) -> str:
        """The one-line result, the dev and test tables under both rank rules, and where it is written."""
        lines = [str(self)]
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            for split in ("dev", "test"):
                lines += ["", f"{split}:", results_table([self], split).round(2).to_string(index=False)]
        lines += ["", f"wrote {self.metrics_path}"]
        return "\n".join(lines)


RULE_LABELS = {"strict": "strict (released)", "pessimistic": "pessimistic"}


def results_table(results: list[RunResult], split: str = "test", rules: tuple[str, ...] = ("strict", "pessimistic")
                  ) -> pd.DataFrame:
    """Runs side by side, one row per rank rule: H@k / MRR / MR of ``split`` under each protocol, in %.

    ``strict`` is the released rule (ties favour the gold), ``pessimistic`` counts ties against it;
    a run read from an older metrics.json has only its own rule.
    """
    rows = []
    for r in results:
        by_rule = r.metrics_by_rule or {r.config.get("rank_rule", "pessimistic"): r.metrics}
        for rule in rules:
            if rule not in by_rule:
                continue
            row = {"variant": r.variant, "ablation": r.ablation, "rank rule": RULE_LABELS[rule]}
            for proto, ms in by_rule[rule].get(split, {}).items():
                for k, v in ms.items():
                    if k == "n":
                        continue
                    row[f"{proto} {k}"] = (100 * v if k.startswith("H@") or k == "MRR" else v) if v is not None else None
            rows.append(row)
    return pd.DataFrame(rows)


def plot_curves(results: RunResult | list[RunResult], protocol: str = "dim"):
    """Training loss per epoch and dev H@1 per evaluation, one line per run; returns the figure."""
    import matplotlib.pyplot as plt

    from .plots import set_style

    set_style()
    results = [results] if isinstance(results, RunResult) else list(results)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
        label = f"{r.variant}" + ("" if r.ablation == "none" else f" ({r.ablation})")
        tr = r.curve.get("train", [])
        ax1.plot([p["epoch"] for p in tr], [p["loss"] for p in tr], label=label)
        dv = [p for p in r.curve.get("dev", []) if protocol in p]
        ax2.plot([p["epoch"] for p in dv], [100 * p[protocol]["H@1"] for p in dv], marker=".", label=label)
    ax1.set(xlabel="epoch", ylabel="training loss", title="training loss")
    ax2.set(xlabel="epoch", ylabel=f"dev H@1 (%), {protocol} protocol", title="dev H@1")
    ax2.legend()
    notes = {r.note for r in results if r.note}
    if notes:
        fig.suptitle("; ".join(sorted(notes)), fontsize=8)
    fig.tight_layout()
    return fig


@torch.no_grad()
def attention_weights(run_dir: str | Path, dataset: datasets.Dataset, features: Any, split: str = "test",
                      device: str = "cpu") -> pd.DataFrame:
    """Per-mention attention weights of a ``paper`` run (mean over heads), one column per key.

    Rows follow ``dataset.split(split)``; a masked key (unusable image, missing cue) has weight 0.
    For the error-analysis notebook: which modality did the mention attend to?
    """
    model, cfg = load_model(run_dir, device)
    if getattr(model, "key_names", None) is None or not model.cfg.use_attention:
        raise ConfigError(f"run {Path(run_dir).name} has no attention weights (variant {cfg.variant}, "
                          f"ablation {cfg.ablation})")
    _check_features(dataset, features)
    inputs = _inputs(features, device)
    inputs.pop("stacked")
    rows = np.flatnonzero((dataset.mentions["split"] == split).to_numpy())
    _, w = encode(model, inputs, rows, attention=True)  # [N, heads, K]
    df = pd.DataFrame(w.mean(1).cpu().numpy(), columns=model.key_names)
    df.insert(0, "mention_id", dataset.mentions["mention_id"].to_numpy()[rows])
    return df


# --------------------------------------------------------------------------------------------
# data


_ARRAYS = ("mention", "mention_sentence", "image", "cue")


@dataclass
class _Split:
    rows: np.ndarray  # mention rows of the feature arrays
    gold: np.ndarray  # entity indices
    mention_ids: list[str]
    cand: np.ndarray | None  # [N, C] gold first, -1 padded


def _check_features(ds: datasets.Dataset, feats: Any) -> None:
    src = f"features of {ds.name} ({getattr(feats, 'model_id', '?')})"
    for name in ("model_id", "weights_real", "mention_ids", "entity_qids", "image_ok", "cue_ok", "entity",
                 *_ARRAYS):
        if not hasattr(feats, name):
            raise DataError("FeatureSet lacks a field", file=src, field=name)
    mids = ds.mentions["mention_id"].tolist()
    if list(feats.mention_ids) != mids:
        raise DataError(f"mention order differs from {ds.name}'s mentions.parquet "
                        f"({len(feats.mention_ids)} feature rows, {len(mids)} mentions): recompute features",
                        file=src, field="mention_ids")
    if list(feats.entity_qids) != ds.entities["qid"].tolist():
        raise DataError(f"entity order differs from {ds.name}'s entities.parquet: recompute features",
                        file=src, field="entity_qids")
    n, e = len(mids), len(feats.entity_qids)
    for name in _ARRAYS:
        a = getattr(feats, name)
        if a is None and name == "cue":
            continue
        if np.shape(a)[0] != n:
            raise DataError(f"{np.shape(a)[0]} rows for {n} mentions", file=src, field=name)
    if np.shape(feats.entity)[0] != e:
        raise DataError(f"{np.shape(feats.entity)[0]} rows for {e} entities", file=src, field="entity")
    # a NaN feature would poison the loss (training stops) or silently rank last: name it up front
    for name, ids in [(n, mids) for n in _ARRAYS] + [("entity", feats.entity_qids),
                                                     ("entity_original", feats.entity_qids)]:
        a = getattr(feats, name, None)
        if a is None:
            continue
        bad = ~np.isfinite(np.asarray(a)).all(axis=1)
        if bad.any():
            raise DataError(f"non-finite feature values in {int(bad.sum())} row(s)", file=src,
                            record=ids[int(np.argmax(bad))], field=name)


def _split_data(ds: datasets.Dataset, split: str, cfg: TrainConfig, eindex: dict[str, int],
                need_cand: bool) -> tuple[_Split, int]:
    m = ds.mentions
    mask = (m["split"] == split).to_numpy()
    gold_q = m["qid"].to_numpy()
    nil = int((mask & pd.isna(gold_q)).sum())
    rows = np.flatnonzero(mask & ~pd.isna(gold_q))
    mids = m["mention_id"].to_numpy()[rows].tolist()
    gold = []
    for mid, q in zip(mids, gold_q[rows]):
        if q not in eindex:
            raise DataError(f"gold {q!r} is not in the knowledge base", file=f"{ds.name}: mentions",
                            record=mid, field="qid")
        gold.append(eindex[q])
    gold = np.asarray(gold, dtype=np.int64)
    cand = None
    if need_cand:
        if ds.candidates is None:
            raise ConfigError(f"{ds.name} has no candidate lists: run `dimkit candidates {ds.name}` "
                              "or train with protocols=kb, select_protocol=kb and negatives other than candidates")
        cand = candidate_matrix(ds.candidates, mids, gold, eindex, cfg.candidate_limit,
                                source=f"{ds.root / 'candidates.parquet'}")
    return _Split(rows, gold, mids, cand), nil


def _inputs(feats: Any, device: str) -> dict[str, torch.Tensor]:
    """Feature tensors on ``device``; the four inputs are views of one ``[N, 4, D]`` tensor."""
    n = len(feats.mention_ids)
    arrays = []
    for name in _ARRAYS:
        a = getattr(feats, name)
        if a is None:  # a FeatureSet of a dataset without cues
            a = np.zeros_like(np.asarray(feats.mention))
        arrays.append(torch.as_tensor(np.asarray(a, dtype=np.float32)))
    stacked = torch.stack(arrays, 1).to(device)  # [N, 4, D]: a batch is one gather
    out = {name: stacked[:, i] for i, name in enumerate(_ARRAYS)}
    out["stacked"] = stacked
    cue_ok = feats.cue_ok if feats.cue_ok is not None else np.zeros(n, dtype=bool)
    out["image_ok"] = torch.as_tensor(np.asarray(feats.image_ok, dtype=bool), device=device)
    out["cue_ok"] = torch.as_tensor(np.asarray(cue_ok, dtype=bool), device=device)
    return out


# --------------------------------------------------------------------------------------------
# checkpoints


def load_checkpoint(path: str | Path, device: str = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True`` (no pickle code runs); a damaged file is named."""
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise DataError("file not found", file=path) from None
    except Exception as exc:  # torch raises RuntimeError, EOFError, OSError, UnpicklingError ... on damage
        raise DataError(f"damaged or not a dimkit checkpoint ({type(exc).__name__}: {str(exc)[:160]})",
                        file=path) from None
    if not isinstance(data, dict):
        raise DataError("not a dimkit checkpoint (expected a dict of tensors)", file=path)
    return data


def load_model(run_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """The selected model of a finished run (``model.pt``) and its config, in eval mode."""
    path = Path(run_dir) / "model.pt"
    retrain = "train the run again (`dimkit train` with the same settings writes a new model.pt)"
    try:
        d = load_checkpoint(path, device)
    except DataError as exc:
        raise DataError(f"{exc.reason}; {retrain}", file=path) from None
    try:
        cfg = TrainConfig(**json.loads(d["config"]))
        model = build_model(ModelConfig(**json.loads(d["model_config"]))).to(device)
        model.load_state_dict(d["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"not a model this dimkit can load ({type(exc).__name__}: {str(exc)[:160]}); {retrain}",
                        file=path) from None
    model.eval()
    return model, cfg


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# the run


def _released_set_seed(seed: int) -> None:
    """``nel_model/train.py::set_seed``: Python ``random``, numpy and torch (CUDA included) from one seed."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        # transformers' get_linear_schedule_with_warmup, which the released train.py uses
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    return f


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # The released code means "no decay on bias and LayerNorm.weight"; its name match misses the
    # LayerNorms inside nn.Sequential, we exclude every norm weight and bias as intended.
    norm_params = {id(p) for mod in model.modules() if isinstance(mod, torch.nn.LayerNorm)
                   for p in mod.parameters()}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or id(p) in norm_params else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _note(ds_name: str, weights_real: bool) -> str:
    parts = []
    if not weights_real:
        parts.append("features from random / sample-trained CLIP weights")
    if datasets.base_name(ds_name) == "sample":
        parts.append("synthetic sample")
    return f"{' and '.join(parts)}: {NOT_COMPARABLE}" if parts else ""


#: Share of mentions without an input above which that input counts as missing for a whole run.
MOSTLY_MISSING = 0.5


def missing_inputs(ds: datasets.Dataset, image_ok: np.ndarray, cue_ok: np.ndarray, *, use_image: bool,
                   use_cue: bool) -> dict[str, dict]:
    """Inputs the model would use that most mentions lack: ``{"image": {"share", "cause"}, "cue": ...}``."""
    out = {}
    n = max(len(image_ok), 1)
    if use_image and (~image_ok).sum() / n > MOSTLY_MISSING:
        out["image"] = {"share": round(float((~image_ok).sum() / n), 4), "cause": _image_cause(ds)}
    if use_cue and (~cue_ok).sum() / n > MOSTLY_MISSING:
        out["cue"] = {"share": round(float((~cue_ok).sum() / n), 4), "cause": _cue_cause(ds)}
    return out


def _image_cause(ds: datasets.Dataset) -> str:
    """Why the images are unusable, from the image check's report (what `dimkit images` found)."""
    if ds.mentions["image"].isna().all():
        return "the dataset references no mention image (e.g. MELBench raw files have none)"
    try:
        rep = json.loads((Path(ds.root) / "reports" / "images.json").read_text())
    except (OSError, ValueError):
        return f"see `dimkit images {ds.name}`"
    counts = ", ".join(f"{k} {v}" for k, v in (rep.get("counts") or {}).items())
    notes = "; ".join(rep.get("notes") or [])
    return f"image check: {counts}" + (f"; {notes}" if notes else "")


def _cue_cause(ds: datasets.Dataset) -> str:
    try:
        rep = json.loads((Path(ds.root) / "reports" / "cues.json").read_text())
    except (OSError, ValueError):
        return f"no cue report: run `dimkit cues {ds.name}`"
    if rep.get("expert") in (None, "none"):
        return "the cue expert is 'none'"
    return (f"expert {rep.get('expert')}: {rep.get('mentions_with_cue', 0)} of {rep.get('mentions', 0)} mentions "
            "have a cue (mentions without a usable image get none)")


def _refuse_or_warn(missing: dict[str, dict], cfg: TrainConfig, ds_name: str) -> None:
    """The paper variant's full configuration is refused on missing inputs; anything else is warned about."""
    what = " and ".join(f"{100 * m['share']:.0f}% of the mentions have no {'usable image' if k == 'image' else k} "
                        f"({m['cause']})" for k, m in missing.items())
    ablation = {"image": "no_image", "cue": "no_cue"}
    fix = ("text_only" if len(missing) == 2 else ablation[next(iter(missing))])
    if cfg.variant == "paper" and not cfg.allow_missing_inputs:
        raise ConfigError(
            f"{ds_name}: {what}. The paper variant would attend over inputs that are not there. Restore the "
            f"inputs, pick the matching ablation ({option(f'ablation={fix!r}', f'--ablation {fix}')}), or train anyway with "
            f"{option('allow_missing_inputs=True', '--set allow_missing_inputs=true')} (the run is then named "
            f"...-missing-{'+'.join(missing)}).")
    print(f"WARNING: {ds_name}: {what}. Training anyway: the run's name and metrics.json say so.",
          file=sys.stderr, flush=True)


def run(cfg: TrainConfig, *, dataset: datasets.Dataset | None = None, features: Any = None,
        callback: Callable[[dict], None] | None = None, progress: bool = True) -> RunResult:
    """Train, select on dev, evaluate dev and test under both protocols; write the run folder.

    ``dataset`` and ``features`` default to ``datasets.load(cfg.dataset)`` and
    ``features.load_features(...)``; tests pass their own. ``callback`` receives an event dict at
    the start of each epoch (``"epoch_start"``), after every step (``"step"``: step, epoch, loss),
    evaluation (``"eval"``: dev metrics) and epoch (``"epoch"``: mean loss), so a notebook can plot
    live; an exception raised there stops the run like Ctrl-C (the last checkpoint stays).
    """
    cfg = copy.deepcopy(cfg).validate()
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _run(cfg, dataset, features, callback, progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, dataset: datasets.Dataset | None, features: Any,
         callback: Callable[[dict], None] | None, progress: bool) -> RunResult:
    t_start = time.perf_counter()
    from .env import pick_device
    device = pick_device(cfg.device)
    abl = parse_ablation(cfg.ablation)
    protocols = cfg.protocols.split(",")
    ds = dataset if dataset is not None else datasets.load(cfg.dataset)
    # --- every input that does not need the features is checked before they are computed
    eindex = {q: i for i, q in enumerate(ds.entities["qid"].tolist())}
    need_cand = "dim" in protocols or cfg.negatives == "candidates"
    train, nil_train = _split_data(ds, "train", cfg, eindex, need_cand)
    dev, nil_dev = _split_data(ds, "dev", cfg, eindex, need_cand)
    test, nil_test = _split_data(ds, "test", cfg, eindex, need_cand)
    if len(train.rows) == 0:
        raise DataError("no training mention with a gold entity", file=f"{ds.name}: mentions", field="split")
    if len(dev.rows) == 0:
        raise DataError("no dev mention with a gold entity: model selection needs a dev split",
                        file=f"{ds.name}: mentions", field="split")
    if "original_descriptions" in abl and "description_original" not in ds.entities.columns:
        raise ConfigError(f"ablation 'original_descriptions' needs original descriptions: {ds.name} "
                          "is not an augmented ('+') dataset")

    if features is None:
        from .features import load_features
        features = load_features(ds, clip=cfg.clip)
    _check_features(ds, features)
    if "original_descriptions" in abl:
        if getattr(features, "entity_original", None) is None:
            raise ConfigError(f"ablation 'original_descriptions' needs original descriptions: {ds.name} "
                              "is not an augmented ('+') dataset")
        ent_np, desc_col = features.entity_original, "description_original"
    else:
        ent_np, desc_col = features.entity, "description"

    image_ok = np.asarray(features.image_ok, dtype=bool)
    cue_ok = np.asarray(features.cue_ok, dtype=bool) if features.cue_ok is not None else np.zeros(len(image_ok), bool)
    counts = {"train": len(train.rows), "dev": len(dev.rows), "test": len(test.rows),
              "nil_skipped": nil_train + nil_dev + nil_test, "entities": len(eindex),
              "unusable_images": int((~image_ok).sum()), "missing_cues": int((~cue_ok).sum())}
    mcfg = ModelConfig.from_ablation(cfg.ablation, variant=cfg.variant)
    missing = missing_inputs(ds, image_ok, cue_ok, use_image=mcfg.use_image, use_cue=mcfg.use_cue)
    run_name = cfg.name()
    if missing:
        _refuse_or_warn(missing, cfg, ds.name)
        if not cfg.run_name:  # the default name says it; a name the user chose is kept
            run_name += "-missing-" + "+".join(missing)
    run_dir = paths.runs_dir() / run_name
    ckpt_path = run_dir / "checkpoint.pt"

    inputs = _inputs(features, device)
    entities = torch.as_tensor(np.asarray(ent_np, dtype=np.float32), device=device)
    dim = int(entities.shape[1])
    hidden = cfg.hidden if cfg.hidden is not None else dim
    if hidden % cfg.heads:
        raise ConfigError(f"hidden size {hidden} (the feature size unless set) is not divisible by "
                          f"heads={cfg.heads}")
    mcfg = ModelConfig.from_ablation(cfg.ablation, variant=cfg.variant, dim=dim, hidden=hidden,
                                     heads=cfg.heads, dropout=cfg.dropout,
                                     separate_projections=cfg.separate_projections)
    if mcfg.use_cue and not cue_ok.any():
        mcfg.use_cue = False  # no cue at all (e.g. WikiDiverse, which the released code gives none)

    # --- state: fresh or from the checkpoint
    released_seeding = cfg.seeding == "released"
    if released_seeding:
        _released_set_seed(cfg.seed)  # main() seeds before it builds the model ...
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    if cfg.optimizer == "released":
        optimizer = ReleasedAdamW(released_param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.adam_epsilon)
    else:
        # the fused kernel is about twice as fast as the per-tensor loop on CPU and CUDA
        optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.adam_epsilon,
                                      **({"fused": True} if device.split(":")[0] in ("cpu", "cuda") else {}))
    steps_per_epoch = math.ceil(len(train.rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.num_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total_steps))
    if released_seeding:
        _released_set_seed(cfg.seed)  # ... and train() seeds again before its loop
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    sampler = None
    if cfg.num_negatives > 0:
        if cfg.negatives == "tfidf":
            descs = ds.entities[desc_col].tolist() if desc_col in ds.entities else [None] * len(eindex)
            cls = ReleasedTfidfSampler if released_seeding else TfidfNegativeSampler
            sampler = cls.from_entities(ds.entities["name"].tolist(), descs, hard_prob=cfg.hard_prob,
                                        stop_list=cfg.stop_list, **({"seed": cfg.seed} if released_seeding else {}))
        elif cfg.negatives == "random":
            sampler = RandomNegativeSampler(len(eindex))
        else:
            sampler = CandidateNegativeSampler([[int(e) for e in r[1:] if e >= 0] for r in train.cand],
                                               len(eindex))
    state = dict(step=0, epoch=0, pos=0, perm=None, best_state=None, best_score=-1.0, best_step=None,
                 best_epoch=None, best_dev=None, since_best=0, curve={"train": [], "dev": []},
                 epoch_loss=[0.0, 0], eval_loss=[0.0, 0], wall=0.0, finished=False, status="running")
    ck = None
    if cfg.resume and ckpt_path.exists():
        try:
            ck = load_checkpoint(ckpt_path, device)
        except DataError as exc:
            raise DataError(f"{exc.reason}. It cannot be resumed: rerun {option('with resume=False', 'with --no-resume')} "
                            f"to train {run_name} from the start (the damaged file is then replaced)",
                            file=ckpt_path) from None
    if ck is not None and (ck.get("format") != CHECKPOINT_FORMAT or ck.get("code_version") != CODE_VERSION
                           or ck.get("feature_model") != str(features.model_id)):
        # same config, but older code or other features: its numbers would be stale
        print(f"checkpoint of {run_name} was made by other code or features "
              f"({ck.get('feature_model')}, code v{ck.get('code_version')}): training again")
        ck = None
    if ck is not None:
        old = json.loads(ck["config"])
        diff = [k for k in old if k not in _NOT_IN_FINGERPRINT and old[k] != cfg.to_dict().get(k)]
        if diff:
            raise ConfigError(f"{ckpt_path} was written with a different config ({', '.join(diff)}); "
                              f"start a new run instead ({option('resume=False', '--no-resume')})")
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["rng"]["torch"].cpu())
        if ck["rng"].get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng"]["cuda"]])
        shuffle_gen.set_state(ck["rng"]["shuffle"].cpu())
        np_rng.bit_generator.state = json.loads(ck["rng"]["numpy"])
        if ck["rng"].get("negatives") is not None and hasattr(sampler, "setstate"):
            sampler.setstate(ck["rng"]["negatives"])
        s = ck["state"]
        perm = ck["perm"].cpu() if ck["perm"] is not None else None
        state.update(step=s["step"], epoch=s["epoch"], pos=s["pos"], perm=perm,
                     best_state=ck["best_state"], best_score=s["best_score"], best_step=s["best_step"],
                     best_epoch=s["best_epoch"], best_dev=s["best_dev"], since_best=s["since_best"],
                     curve=json.loads(s["curve"]), epoch_loss=s["epoch_loss"], eval_loss=s["eval_loss"],
                     wall=s["wall"], finished=s["finished"], status=s["status"])
        if state["finished"]:
            print(f"{run_name} finished earlier ({state['status']}): evaluating its selected model")
        else:
            print(f"resuming {run_name} from step {state['step']} "
                  f"(epoch {state['epoch'] + state['pos'] / steps_per_epoch:.2f})")
    else:
        if cfg.resume and not ckpt_path.exists():
            print(f"no checkpoint in {run_dir}: starting {run_name} from scratch")
        for stale in ("checkpoint.pt", "metrics.json", "model.pt", "predictions.parquet"):
            (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    stacked = inputs.pop("stacked")
    train_rows = torch.as_tensor(train.rows, device=device)
    train_gold = torch.as_tensor(train.gold, device=device)

    def evaluate_split(sp: _Split, model_: torch.nn.Module, rule: str = cfg.rank_rule) -> tuple[dict, dict]:
        q = encode(model_, inputs, sp.rows)
        return evaluate_queries(q, entities, sp.gold, sp.cand, rule, protocols)

    def save_checkpoint() -> None:
        rng = {"torch": torch.get_rng_state(), "shuffle": shuffle_gen.get_state(),
               "numpy": json.dumps(np_rng.bit_generator.state),
               "negatives": json.dumps(sampler.getstate()) if hasattr(sampler, "getstate") else None,
               "cuda": torch.cuda.get_rng_state_all() if device.startswith("cuda") else None}
        s = {k: state[k] for k in ("step", "epoch", "pos", "best_score", "best_step", "best_epoch", "best_dev",
                                   "since_best", "epoch_loss", "eval_loss", "finished", "status")}
        s["curve"] = json.dumps(state["curve"])
        s["wall"] = state["wall"] + (time.perf_counter() - t_start)
        atomic.write_torch({"format": CHECKPOINT_FORMAT, "code_version": CODE_VERSION,
                            "feature_model": str(features.model_id), "config": json.dumps(cfg.to_dict()),
                            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "rng": rng, "perm": state["perm"],
                            "best_state": state["best_state"], "state": s}, ckpt_path)

    def emit(event: dict) -> None:
        if callback is not None:
            callback(event)

    # --- the loop
    model.train()
    # no explicit disable=False: it would override TQDM_DISABLE, which CI sets
    bar = tqdm(total=total_steps, initial=state["step"], desc=run_name, leave=False,
               **({} if progress else {"disable": True}))
    try:
        while not state["finished"]:
            if state["epoch"] >= cfg.num_epochs:
                state.update(finished=True, status="completed")
                break
            if state["pos"] == 0 or state["perm"] is None:
                if released_seeding:  # torch's RandomSampler: a fresh generator seeded from the global stream
                    order = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
                    state["perm"] = torch.randperm(len(train.rows), generator=order)
                else:
                    state["perm"] = torch.randperm(len(train.rows), generator=shuffle_gen)
            perm = state["perm"].to(device)
            emit({"event": "epoch_start", "epoch": state["epoch"] + 1, "step": state["step"]})
            while state["pos"] < steps_per_epoch:
                b = perm[state["pos"] * cfg.batch_size:(state["pos"] + 1) * cfg.batch_size]
                rows, gold = train_rows[b], train_gold[b]
                x = stacked[rows]  # [B, 4, D]: one gather for the four inputs
                batch = {k: x[:, i] for i, k in enumerate(_ARRAYS)}
                batch["image_ok"], batch["cue_ok"] = inputs["image_ok"][rows], inputs["cue_ok"][rows]
                neg = None
                if sampler is not None:
                    idx = sampler.sample(gold.cpu().numpy(), np_rng, rows=b.cpu().numpy(), k=cfg.num_negatives)
                    neg = entities[torch.as_tensor(idx, device=device)]  # [B, D] or [B, K, D]
                q = model(batch)
                loss = compute_loss(cfg.loss, q, entities[gold], neg, gold, l2_reg=cfg.l2_reg,
                                    temperature=cfg.temperature)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    _diverged(f"loss is {lv}", state, cfg, ckpt_path, run_dir, run_name, steps_per_epoch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                if not math.isfinite(float(gnorm)):
                    _diverged(f"gradient norm is {float(gnorm)}", state, cfg, ckpt_path, run_dir, run_name,
                              steps_per_epoch)
                optimizer.step()
                scheduler.step()
                state["step"] += 1
                state["pos"] += 1
                for acc in (state["epoch_loss"], state["eval_loss"]):
                    acc[0] += lv
                    acc[1] += 1
                bar.update(1)
                emit({"event": "step", "step": state["step"], "epoch": state["epoch"] + 1, "loss": lv})
                end_of_epoch = state["pos"] == steps_per_epoch
                due = (cfg.eval_steps and state["step"] % cfg.eval_steps == 0) or \
                      (end_of_epoch and (cfg.eval_steps == 0 or state["epoch"] + 1 == cfg.num_epochs))
                if end_of_epoch:
                    el = state["epoch_loss"]
                    state["curve"]["train"].append({"epoch": state["epoch"] + 1, "step": state["step"],
                                                    "loss": el[0] / max(el[1], 1)})
                    state["epoch_loss"] = [0.0, 0]
                    state["epoch"] += 1
                    state["pos"] = 0
                    bar.set_postfix(loss=f"{state['curve']['train'][-1]['loss']:.3f}")
                    emit({"event": "epoch", **state["curve"]["train"][-1]})
                if due:
                    if released_seeding and isinstance(sampler, ReleasedTfidfSampler):
                        # the released dev set draws a negative as each item loads, at every evaluation
                        sampler.sample(dev.gold, k=cfg.num_negatives)
                    if _evaluate_and_select(state, model, dev, evaluate_split, cfg, steps_per_epoch, emit):
                        state.update(finished=True, status="early_stopped")
                    elif state["epoch"] >= cfg.num_epochs:
                        state.update(finished=True, status="completed")
                    save_checkpoint()
                    if state["finished"]:
                        break
                if end_of_epoch:
                    break
    finally:
        bar.close()

    # --- final: the selected model on dev and test
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.eval()
    # Both rank rules, side by side: strict is the released rule (ties favour the gold), pessimistic
    # counts ties against it; ``metrics`` is the run's own ``rank_rule``.
    by_rule: dict[str, dict] = {rule: {} for rule in RULES}
    ranks = {}
    for split_name, sp in (("dev", dev), ("test", test)):
        for rule in RULES:
            by_rule[rule][split_name], r = evaluate_split(sp, model, rule)
            if rule == cfg.rank_rule:
                ranks[split_name] = r
    metrics = by_rule[cfg.rank_rule]
    wall = state["wall"] + (time.perf_counter() - t_start)
    note = _note(ds.name, bool(features.weights_real))
    if missing:
        said = ", ".join(f"{k} {100 * m['share']:.0f}%" for k, m in missing.items())
        note = "; ".join(x for x in (f"INPUTS MOSTLY MISSING ({said} of mentions lack them)", note) if x)
    best = {"step": state["best_step"], "epoch": state["best_epoch"],
            f"dev {cfg.select_protocol} H@1": state["best_score"] if state["best_step"] is not None else None}
    result = RunResult(run_name=run_name, run_dir=run_dir, dataset=ds.name, variant=cfg.variant,
                       ablation=cfg.ablation, config=cfg.to_dict(), metrics=metrics, best=best,
                       curve=state["curve"], status=state["status"], wall_time_s=wall,
                       feature_model=str(features.model_id), weights_real=bool(features.weights_real),
                       note=note, counts=counts, inputs_missing=missing, metrics_by_rule=by_rule)
    _write_outputs(result, cfg, model, mcfg, ds, entities, inputs, (dev, test), ranks, device, protocols)
    write_feature_provenance(run_dir, cfg, ds, features, desc_col)  # what dimkit.link needs
    return result


def _evaluate_and_select(state: dict, model: torch.nn.Module, dev: _Split, evaluate_split, cfg: TrainConfig,
                         steps_per_epoch: int, emit) -> bool:
    """Evaluate on dev, keep the best weights; True when early stopping says stop."""
    metrics, _ = evaluate_split(dev, model)
    model.train()
    el = state["eval_loss"]
    point = {"epoch": round(state["epoch"] + state["pos"] / steps_per_epoch, 4), "step": state["step"],
             "loss": el[0] / max(el[1], 1), **metrics}
    state["eval_loss"] = [0.0, 0]
    state["curve"]["dev"].append(point)
    score = metrics[cfg.select_protocol]["H@1"]
    if score is not None and score > state["best_score"]:
        state.update(best_state=_clone_state(model), best_score=score, best_step=state["step"],
                     best_epoch=point["epoch"], best_dev=json.dumps(metrics), since_best=0)
    else:
        state["since_best"] += 1
    emit({"event": "eval", **point})
    return bool(cfg.patience and state["since_best"] >= cfg.patience)


def _diverged(what: str, state: dict, cfg: TrainConfig, ckpt_path: Path, run_dir: Path, run_name: str,
              steps_per_epoch: int) -> None:
    step = state["step"] + 1
    epoch = state["epoch"] + 1
    kept = (f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists()
            else "no checkpoint had been written yet")
    msg = (f"training stopped: {what} at step {step} (epoch {epoch}) of run {run_name}; {kept}. "
           f"Try a lower lr (now {cfg.lr}) or check the features for NaN/inf values.")
    atomic.write_text(json.dumps({"run_name": run_name, "status": "diverged", "error": msg,
                                           "config": cfg.to_dict(), "curve": state["curve"]},
                                          indent=2, default=str) + "\n", run_dir / "metrics.json")
    raise TrainingDiverged(msg)


def _write_outputs(result: RunResult, cfg: TrainConfig, model: torch.nn.Module, mcfg: ModelConfig,
                   ds: datasets.Dataset, entities: torch.Tensor, inputs: dict, splits: tuple, ranks: dict,
                   device: str, protocols: list[str]) -> None:
    run_dir = result.run_dir
    atomic.write_torch({"config": json.dumps(cfg.to_dict()), "model_config": json.dumps(dataclasses.asdict(mcfg)),
                        "model": {k: v.cpu() for k, v in model.state_dict().items()}}, run_dir / "model.pt")
    qids = ds.entities["qid"].to_numpy()
    frames = []
    for split_name, sp in zip(("dev", "test"), splits):
        if not len(sp.rows):
            continue
        q = encode(model, inputs, sp.rows)
        _, top = kb_ranks(q, entities, sp.gold, cfg.rank_rule, topk=5)
        df = pd.DataFrame({"mention_id": sp.mention_ids, "split": split_name, "qid": qids[sp.gold]})
        for p in protocols:
            df[f"rank_{p}"] = ranks[split_name][p]
        df["top5"] = [list(qids[t]) for t in top.cpu().numpy()]
        frames.append(df)
    if frames:
        atomic.write_parquet(pd.concat(frames, ignore_index=True), run_dir / "predictions.parquet")
    import platform

    from . import __version__
    out = {
        "run_name": result.run_name, "status": result.status, "dataset": result.dataset,
        "variant": result.variant, "ablation": result.ablation,
        "protocol": {p: PROTOCOL_NOTES[p] for p in protocols}, "rank_rule": cfg.rank_rule,
        "rank_rules": RULE_NOTES, "metrics_by_rule": result.metrics_by_rule,
        "procedure": procedure(cfg),
        "selection": f"best dev H@1 ({cfg.select_protocol} protocol) over all evaluations",
        "metrics": result.metrics, "best": result.best, "config": result.config, "seed": cfg.seed,
        "feature_model": result.feature_model, "weights_real": result.weights_real, "note": result.note,
        "wall_time_s": result.wall_time_s, "device": device, "counts": result.counts,
        "inputs_missing": result.inputs_missing, "curve": result.curve,
        # versions only of what training touches: importing transformers/open_clip here costs seconds
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "dimkit": __version__},
    }
    atomic.write_text(json.dumps(out, indent=2, default=str) + "\n", run_dir / "metrics.json")


#: The command line: ``dimkit train`` takes the flags of :class:`TrainConfig`, runs :func:`run`, prints its result.
CONFIG = TrainConfig


# --------------------------------------------------------------------------------------------
# Feature provenance for dimkit.link: which CLIP, precision, expert and entity texts
# the run was trained on, so new mentions get their features from the very same models.

PROVENANCE_FILE = "features.json"
PROVENANCE_FORMAT = "dimkit-run-features/1"


def _portable_clip_spec(given: str) -> str:
    """A ``--clip`` value that still means the same model from another working directory."""
    arch, sep, rest = given.partition(":")
    if Path(given).expanduser().exists():
        return str(Path(given).expanduser().resolve())
    if sep and rest and Path(rest).expanduser().exists():
        return f"{arch}:{Path(rest).expanduser().resolve()}"
    return given


def feature_provenance(cfg: TrainConfig, ds: datasets.Dataset, features: Any, desc_col: str) -> dict:
    """What ``features.json`` records; a spec that cannot be confirmed against the features is None."""
    from .store import content_hash

    meta = dict(getattr(features, "meta", None) or {})
    model_id = str(getattr(features, "model_id", ""))
    clip_spec = None
    try:
        if "feature_version" not in meta:  # not made by dimkit.features (e.g. a test's hand-built set)
            raise DimkitError("features of unknown origin")
        from .clip import parse_clip_spec
        from .features import resolve_clip_name

        given = meta.get("clip_spec") or resolve_clip_name(ds.name, cfg.clip)
        if parse_clip_spec(given).model_id == model_id:
            clip_spec = _portable_clip_spec(given)
    except DimkitError:
        pass
    expert_spec = None
    if meta.get("cue_expert") is not None:
        try:
            from .cues import default_expert
            from .experts import make_expert

            given = meta.get("cue_expert_spec") or default_expert(ds.name)
            ex = make_expert(given)
            if ex.model_id == meta.get("cue_expert") and ex.version == meta.get("cue_prompt_version"):
                expert_spec = given
        except DimkitError:
            pass
    return {
        "format": PROVENANCE_FORMAT, "dataset": ds.name, "feature_model": model_id,
        "clip_spec": clip_spec, "weights_real": bool(getattr(features, "weights_real", False)),
        "precision": meta.get("precision"), "feature_version": meta.get("feature_version"),
        "cue_expert": meta.get("cue_expert"), "cue_expert_spec": expert_spec,
        "cue_prompt_version": meta.get("cue_prompt_version"), "synthetic_cues": meta.get("synthetic_cues"),
        "missing_description": meta.get("missing_description", "name"),
        "entity_column": desc_col, "entities": int(len(ds.entities)),
        "entity_qids_sha256": content_hash(ds.entities["qid"].astype(str).tolist()),
    }


def write_feature_provenance(run_dir: Path, cfg: TrainConfig, ds: datasets.Dataset, features: Any,
                             desc_col: str) -> Path:
    """Write ``runs/<run-name>/features.json`` (read by :mod:`dimkit.link`)."""
    target = Path(run_dir) / PROVENANCE_FILE
    data = feature_provenance(cfg, ds, features, desc_col)
    atomic.write_text(json.dumps(data, indent=2) + "\n", target)
    return target
