"""Train and evaluate DIM (notebook ``03_train``; ``dimkit train NAME``): ``run(TrainConfig) -> RunResult``.

The loop is the released ``nel_model/train.py`` -- N-pair loss, TF-IDF hard negatives, linear warm-up
and decay, gradient clipping -- over the frozen features of :mod:`dimkit.features`, with its four
procedure switches in :data:`RELEASED_PROCEDURE`. dimkit adds model selection on dev under both
protocols of :mod:`dimkit.evaluate`, checkpoints that resume to exactly the metrics of an uninterrupted
run, a stop on a non-finite loss, and the run folder ``runs/<run-name>/`` (``metrics.json``,
``predictions.parquet``, ``model.pt``, ``features.json``). The run name carries a hash of the config,
so a rerun finds its folder and a changed config gets a new one.
"""
from __future__ import annotations

import contextlib
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
from .store import content_hash
from .evaluate import (PROTOCOL_NOTES, PROTOCOLS, RULE_NOTES, RULES, candidate_matrix, encode, evaluate_queries,
                       evaluate_rules, kb_ranks)
from .losses import LOSSES, compute_loss
from .model import ABLATIONS, VARIANTS, ModelConfig, build_model, parse_ablation
from .negatives import (SAMPLERS, STOP_LISTS, CandidateNegativeSampler, RandomNegativeSampler,
                        ReleasedTfidfSampler, TfidfNegativeSampler)
from .optim import OPTIMIZERS, ReleasedAdamW, released_param_groups

CHECKPOINT_FORMAT = 1
#: Bump when a change to the model, loss, sampler or loop changes results: older checkpoints of
#: the same config are then trained again instead of resumed.
CODE_VERSION = 2


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
    max_grad_norm: float | None = setting(1.0, "gradient clipping: the largest gradient norm (none: no clipping)",
                                          above=0, cli=False)
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
    seed: int = setting(114514, "seed (the released scripts' 114514)", min=0)
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
        """The dataset's preset (from the released scripts) with ``overrides`` (None keeps the preset; set a
        setting to None with :meth:`replace`). ``variant="released"`` also takes :data:`RELEASED_PROCEDURE`
        for every key not given."""
        if (overrides.get("variant") or cls.variant) == "released":
            overrides = {**RELEASED_PROCEDURE, **{k: v for k, v in overrides.items() if v is not None}}
        return super().for_dataset(dataset, **overrides)

    def check(self) -> None:
        """Cross-field checks (names of ablations and protocols, sizes that must agree)."""
        self.ablation = ",".join(parse_ablation(self.ablation)) or "none"
        protos = [p.strip() for p in self.protocols.split(",") if p.strip()]
        if not protos or any(p not in PROTOCOLS for p in protos):
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
        if self.run_name is not None:
            paths.check_name(self.run_name, self.label("run_name"))
        ModelConfig.from_ablation(self.ablation, variant=self.variant)  # variant/ablation clash

    def fingerprint(self) -> str:
        """Short hash of what changes the result (not device, run name or resume; ``clip`` spelled as
        ``auto`` whenever it is what ``auto`` picks, so ``--clip sample`` on the sample is the same run)."""
        d = _comparable(self.to_dict())
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def name(self) -> str:
        """The run folder name."""
        if self.run_name:
            return self.run_name
        abl = self.ablation.replace(",", "+") if self.ablation != "none" else "full"
        return f"{self.dataset}-{self.variant}-{abl}-s{self.seed}-{self.fingerprint()}"


#: Settings that do not change a run's results: left out of its name and free to differ on resume.
_NOT_IN_FINGERPRINT = ("device", "run_name", "resume", "num_threads", "allow_missing_inputs")


def _comparable(config: dict) -> dict:
    """A config as runs are told apart: without :data:`_NOT_IN_FINGERPRINT`, and with a ``clip`` that
    names what ``auto`` picks for the dataset (``sample``, ``default``, ``ViT-B-32:openai``) written ``auto``."""
    from .clip import DEFAULT_CLIP, SAMPLE_CLIP_NAMES
    from .features import resolve_clip_name

    d = {k: v for k, v in config.items() if k not in _NOT_IN_FINGERPRINT}
    clip = d.get("clip")
    if isinstance(clip, str) and isinstance(d.get("dataset"), str):
        auto = resolve_clip_name(d["dataset"], "auto")
        same = {"default", DEFAULT_CLIP.lower()} if auto == "default" else set(SAMPLE_CLIP_NAMES)
        if clip.strip().lower() in same:
            d["clip"] = "auto"
    return d
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
PRESETS["default"] = PRESETS["wikimel"]  # any other dataset: the WikiMEL script
TrainConfig.PRESETS = PRESETS

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


def procedure(cfg: TrainConfig) -> dict:
    """Each training-procedure switch of ``cfg``: its value and whether it is the released one."""
    out = {}
    for key, released in RELEASED_PROCEDURE.items():
        same = getattr(cfg, key) == released
        out[key] = {"value": getattr(cfg, key), "released": same,
                    "what": "as released" if same else DIMKIT_PROCEDURE[key]}
    return out


#: The command line: ``dimkit train`` takes the flags of :class:`TrainConfig`, runs :func:`run`, prints its result.
CONFIG = TrainConfig


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


def results_table(results: list, split: str = "test", rules: tuple[str, ...] = ("strict", "pessimistic")
                  ) -> pd.DataFrame:
    """Runs (results or :func:`dimkit.runs.read` records) side by side, one row per rank rule: H@k / MRR /
    MR of ``split`` under each protocol, in %; a run without a rule's metrics has no row for it."""
    rows = []
    for r in results:
        for rule in rules:
            if rule not in r.metrics_by_rule:
                continue
            row = {"variant": r.variant, "ablation": r.ablation, "rank rule": RULE_LABELS[rule]}
            for proto, ms in r.metrics_by_rule[rule].get(split, {}).items():
                for k, v in ms.items():
                    if k != "n":
                        row[f"{proto} {k}"] = 100 * v if v is not None and (k.startswith("H@") or k == "MRR") else v
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
    """Per-mention attention weights of a ``paper`` run on ``split`` (mean over heads; a masked key has weight 0)."""
    model, cfg = load_model(run_dir, device)
    if getattr(model, "key_names", None) is None or not model.cfg.use_attention:
        raise ConfigError(f"run {Path(run_dir).name} has no attention weights (variant {cfg.variant}, "
                          f"ablation {cfg.ablation})")
    _check_features(dataset, features)
    _, inputs = _inputs(features, device)
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
    nil: int  # mentions without a gold entity, left out


def _check_features(ds: datasets.Dataset, feats: Any) -> None:
    """Rows aligned with the dataset's mentions and entities, and every value finite (a NaN would poison
    the loss or silently rank last: it is named up front)."""
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
    for name in (*_ARRAYS, "entity", "entity_original"):
        a = getattr(feats, name, None)
        if a is None and name in ("cue", "entity_original"):
            continue
        a = np.asarray(a)
        ids, what = (list(feats.entity_qids), "entities") if name.startswith("entity") else (mids, "mentions")
        if (a.shape[0] if a.ndim else 0) != len(ids):
            raise DataError(f"{a.shape[0] if a.ndim else 0} rows for {len(ids)} {what}", file=src, field=name)
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            raise DataError(f"non-finite feature values in {int(bad.sum())} row(s)", file=src,
                            record=ids[int(np.argmax(bad))], field=name)


def _split_data(ds: datasets.Dataset, split: str, cfg: TrainConfig, eindex: dict[str, int],
                need_cand: bool) -> _Split:
    m = ds.mentions
    mask = (m["split"] == split).to_numpy()
    gold_q = m["qid"].to_numpy()
    rows = np.flatnonzero(mask & ~pd.isna(gold_q))
    mids = m["mention_id"].to_numpy()[rows].tolist()
    for mid, q in zip(mids, gold_q[rows]):
        if q not in eindex:
            raise DataError(f"gold {q!r} is not in the knowledge base", file=f"{ds.name}: mentions",
                            record=mid, field="qid")
    gold = np.asarray([eindex[q] for q in gold_q[rows]], dtype=np.int64)
    cand = None
    if need_cand:
        if ds.candidates is None:
            raise ConfigError(f"{ds.name} has no candidate lists: run `dimkit candidates {ds.name}` "
                              "or train with protocols=kb, select_protocol=kb and negatives other than candidates")
        cand = candidate_matrix(ds.candidates, mids, gold, eindex, cfg.candidate_limit,
                                source=f"{ds.root / 'candidates.parquet'}")
    return _Split(rows, gold, mids, cand, nil=int((mask & pd.isna(gold_q)).sum()))


def _inputs(feats: Any, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The four inputs as one ``[N, 4, D]`` tensor on ``device`` (a training batch is one gather), and the
    dict :func:`dimkit.evaluate.encode` takes: views of it and the two masks."""
    n = len(feats.mention_ids)
    mention = np.asarray(feats.mention, dtype=np.float32)
    arrays = [np.zeros_like(mention) if getattr(feats, k) is None else np.asarray(getattr(feats, k), dtype=np.float32)
              for k in _ARRAYS]  # a FeatureSet of a dataset without cues has cue None
    stacked = torch.as_tensor(np.stack(arrays, 1)).to(device)
    inputs = {name: stacked[:, i] for i, name in enumerate(_ARRAYS)}
    inputs["image_ok"] = torch.as_tensor(np.asarray(feats.image_ok, dtype=bool), device=device)
    cue_ok = feats.cue_ok if feats.cue_ok is not None else np.zeros(n, dtype=bool)
    inputs["cue_ok"] = torch.as_tensor(np.asarray(cue_ok, dtype=bool), device=device)
    return stacked, inputs


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


def _recorded_kb(ck: dict, run_dir: Path) -> dict[str, str]:
    """The knowledge base a checkpoint was trained on (:func:`dimkit.datasets.kb_hashes`): recorded in
    it, or, for an older one, in its run's record of its features; what neither records is left out."""
    rec = dict(ck)
    if not any(isinstance(rec.get(k), str) for k in _KB_KEYS):
        try:
            rec = json.loads((run_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    return {k: rec[k] for k in _KB_KEYS if isinstance(rec, dict) and isinstance(rec.get(k), str)}


def off_preset(cfg: TrainConfig) -> dict[str, list]:
    """``{setting: [this run's value, the preset's]}`` for every setting that changes results and differs
    from what ``dimkit train DATASET --variant V --ablation A`` would use (the seed aside: seeds are
    repeats, not other settings). ``metrics.json`` records it, so the tables prefer preset runs."""
    try:
        preset = TrainConfig.for_dataset(cfg.dataset, variant=cfg.variant, ablation=cfg.ablation)
    except DimkitError:
        return {}
    mine, want = _comparable(cfg.to_dict()), _comparable(preset.to_dict())
    return {k: [mine[k], v] for k, v in want.items() if k != "seed" and k in mine and mine[k] != v}


_KB_KEYS = ("entity_qids_sha256", "entity_texts_sha256")


def _resumable(cfg: TrainConfig, ckpt_path: Path, run_name: str, feature_model: str, device: str,
               kb: dict[str, str]) -> dict | None:
    """The run's checkpoint when it can be continued; None when there is none or it is stale (made by
    other code or features, or on another knowledge base: its numbers would be)."""
    if not cfg.resume:
        return None
    if not ckpt_path.exists():
        print(f"no checkpoint in {ckpt_path.parent}: starting {run_name} from scratch")
        return None
    try:
        ck = load_checkpoint(ckpt_path, device)
    except DataError as exc:
        raise DataError(f"{exc.reason}. It cannot be resumed: rerun {option('with resume=False', 'with --no-resume')} "
                        f"to train {run_name} from the start (the damaged file is then replaced)",
                        file=ckpt_path) from None
    if (ck.get("format"), ck.get("code_version"), ck.get("feature_model")) != (CHECKPOINT_FORMAT, CODE_VERSION,
                                                                                feature_model):
        print(f"checkpoint of {run_name} was made by other code or features "
              f"({ck.get('feature_model')}, code v{ck.get('code_version')}): training again")
        return None
    recorded = _recorded_kb(ck, ckpt_path.parent)
    if any(kb.get(k) != v for k, v in recorded.items()):
        print(f"the knowledge base or its descriptions changed since {run_name} was trained: training it again")
        return None
    old, new = _comparable(json.loads(ck["config"])), _comparable(cfg.to_dict())
    diff = [k for k in old if old[k] != new.get(k)]
    if diff:
        raise ConfigError(f"{ckpt_path} was written with a different config ({', '.join(diff)}); "
                          f"start a new run instead ({option('resume=False', '--no-resume')})")
    return ck


# --------------------------------------------------------------------------------------------
# the run


def _released_set_seed(seed: int) -> None:
    """``nel_model/train.py::set_seed``: Python ``random``, numpy and torch (CUDA included) from one seed."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """transformers' ``get_linear_schedule_with_warmup``, which the released train.py uses."""
    def f(step: int) -> float:
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


def _optimizer(cfg: TrainConfig, model: torch.nn.Module, device: str) -> torch.optim.Optimizer:
    if cfg.optimizer == "released":
        return ReleasedAdamW(released_param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.adam_epsilon)
    # the fused kernel is about twice as fast as the per-tensor loop on CPU and CUDA
    fused = {"fused": True} if device.split(":")[0] in ("cpu", "cuda") else {}
    return torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, eps=cfg.adam_epsilon, **fused)


def _sampler(cfg: TrainConfig, ds: datasets.Dataset, desc_col: str, train: _Split):
    """The negative sampler of ``cfg.negatives`` (None without negatives)."""
    n = len(ds.entities)
    if cfg.num_negatives == 0:
        return None
    if cfg.negatives == "random":
        return RandomNegativeSampler(n)
    if cfg.negatives == "candidates":
        return CandidateNegativeSampler([[int(e) for e in r[1:] if e >= 0] for r in train.cand], n)
    descs = ds.entities[desc_col].tolist() if desc_col in ds.entities else [None] * n
    if cfg.seeding == "released":
        return ReleasedTfidfSampler.from_entities(ds.entities["name"].tolist(), descs, hard_prob=cfg.hard_prob,
                                                  stop_list=cfg.stop_list, seed=cfg.seed)
    return TfidfNegativeSampler.from_entities(ds.entities["name"].tolist(), descs, hard_prob=cfg.hard_prob,
                                              stop_list=cfg.stop_list)


#: Share of mentions without an input above which that input counts as missing for a whole run.
MOSTLY_MISSING = 0.5


def missing_inputs(ds: datasets.Dataset, image_ok: np.ndarray, cue_ok: np.ndarray, *, use_image: bool,
                   use_cue: bool) -> dict[str, dict]:
    """Inputs the model would use that most mentions lack: ``{"image": {"share", "cause"}, "cue": ...}``."""
    out = {}
    n = max(len(image_ok), 1)
    for name, ok, used, cause in (("image", image_ok, use_image, _image_cause), ("cue", cue_ok, use_cue, _cue_cause)):
        share = float((~ok).sum() / n)
        if used and share > MOSTLY_MISSING:
            out[name] = {"share": round(share, 4), "cause": cause(ds)}
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
    fix = "text_only" if len(missing) == 2 else {"image": "no_image", "cue": "no_cue"}[next(iter(missing))]
    if cfg.variant == "paper" and not cfg.allow_missing_inputs:
        raise ConfigError(
            f"{ds_name}: {what}. The paper variant would attend over inputs that are not there. Restore the "
            f"inputs, pick the matching ablation ({option(f'ablation={fix!r}', f'--ablation {fix}')}), or train "
            f"anyway with {option('allow_missing_inputs=True', '--set allow_missing_inputs=true')} (the run is "
            f"then named ...-missing-{'+'.join(missing)}).")
    print(f"WARNING: {ds_name}: {what}. Training anyway: the run's name and metrics.json say so.",
          file=sys.stderr, flush=True)


def _note(ds_name: str, weights_real: bool, missing: dict[str, dict]) -> str:
    """What makes the run's numbers not comparable to the paper (empty when nothing does)."""
    parts = []
    if not weights_real:
        parts.append("features from random / sample-trained CLIP weights")
    if datasets.base_name(ds_name) == "sample":
        parts.append("synthetic sample")
    note = f"{' and '.join(parts)}: not comparable to the paper" if parts else ""
    if missing:
        said = ", ".join(f"{k} {100 * m['share']:.0f}%" for k, m in missing.items())
        note = "; ".join(x for x in (f"INPUTS MOSTLY MISSING ({said} of mentions lack them)", note) if x)
    return note


def run(cfg: TrainConfig, *, dataset: datasets.Dataset | None = None, features: Any = None,
        callback: Callable[[dict], None] | None = None, progress: bool = True) -> RunResult:
    """Train, select on dev, evaluate dev and test under both protocols; write the run folder.

    ``dataset`` and ``features`` default to the loaded ``cfg.dataset`` and its features. ``callback`` gets
    an event dict (``epoch_start``, ``step``, ``eval``, ``epoch``) so a notebook can plot live; an exception
    raised there stops the run like Ctrl-C (the last checkpoint stays).
    """
    cfg = cfg.replace()  # a checked copy
    threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    # two processes training one run would both train it and race on its files: the second is refused
    name = cfg.name()
    try:
        with atomic.exclusive(paths.runs_dir() / ".locks" / f"{name}.lock", f"run {name}"):
            return _run(cfg, dataset, features, callback or (lambda event: None), progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: TrainConfig, dataset: datasets.Dataset | None, features: Any, emit: Callable[[dict], None],
         progress: bool) -> RunResult:
    from .env import pick_device

    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    protocols = cfg.protocols.split(",")
    ds = dataset if dataset is not None else datasets.load(cfg.dataset)
    key = _inputs_key(cfg, ds, device) if features is None else None
    if cfg.resume and key is not None:
        done = _read_back(cfg, key)
        if done is not None:
            print(f"{done.run_name} finished earlier on these very inputs ({done.status}): read back")
            return done
    # --- every input that does not need the features is checked before they are computed
    eindex = {q: i for i, q in enumerate(ds.entities["qid"].tolist())}  # qid -> row of the KB
    need_cand = "dim" in protocols or cfg.negatives == "candidates"
    train, dev, test = (_split_data(ds, split, cfg, eindex, need_cand) for split in ("train", "dev", "test"))
    if len(train.rows) == 0:
        raise DataError("no training mention with a gold entity", file=f"{ds.name}: mentions", field="split")
    if len(dev.rows) == 0:
        raise DataError("no dev mention with a gold entity: model selection needs a dev split",
                        file=f"{ds.name}: mentions", field="split")
    originals = "original_descriptions" in parse_ablation(cfg.ablation)
    no_originals = (f"ablation 'original_descriptions' needs original descriptions: {ds.name} "
                    "is not an augmented ('+') dataset")
    if originals and "description_original" not in ds.entities.columns:
        raise ConfigError(no_originals)

    if features is None:
        from .features import load_features
        features = load_features(ds, clip=cfg.clip)
    _check_features(ds, features)
    if originals and getattr(features, "entity_original", None) is None:
        raise ConfigError(no_originals)
    desc_col = "description_original" if originals else "description"
    entities = torch.as_tensor(np.asarray(features.entity_original if originals else features.entity,
                                          dtype=np.float32), device=device)
    stacked, inputs = _inputs(features, device)
    image_ok, cue_ok = inputs["image_ok"].cpu().numpy(), inputs["cue_ok"].cpu().numpy()
    dim = int(entities.shape[1])
    hidden = cfg.hidden if cfg.hidden is not None else dim
    if hidden % cfg.heads:
        raise ConfigError(f"hidden size {hidden} (the feature size unless set) is not divisible by "
                          f"heads={cfg.heads}")
    mcfg = ModelConfig.from_ablation(cfg.ablation, variant=cfg.variant, dim=dim, hidden=hidden,
                                     heads=cfg.heads, dropout=cfg.dropout,
                                     separate_projections=cfg.separate_projections)
    missing = missing_inputs(ds, image_ok, cue_ok, use_image=mcfg.use_image, use_cue=mcfg.use_cue)
    run_name = cfg.name()
    if missing:
        _refuse_or_warn(missing, cfg, ds.name)
        if not cfg.run_name:  # the default name says it; a name the user chose is kept
            run_name += "-missing-" + "+".join(missing)
    if mcfg.use_cue and not cue_ok.any():
        mcfg.use_cue = False  # no cue at all (e.g. WikiDiverse, which the released code gives none)
    run_dir = paths.runs_dir() / run_name
    ckpt_path = run_dir / "checkpoint.pt"
    counts = {"train": len(train.rows), "dev": len(dev.rows), "test": len(test.rows),
              "nil_skipped": train.nil + dev.nil + test.nil, "entities": len(eindex),
              "unusable_images": int((~image_ok).sum()), "missing_cues": int((~cue_ok).sum())}

    # --- the model, optimizer, schedule and random streams, in the released order of seeding
    released_seeding = cfg.seeding == "released"
    if released_seeding:
        _released_set_seed(cfg.seed)  # main() seeds before it builds the model ...
    torch.manual_seed(cfg.seed)
    model = build_model(mcfg).to(device)
    optimizer = _optimizer(cfg, model, device)
    steps_per_epoch = math.ceil(len(train.rows) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.num_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup_steps, total_steps))
    if released_seeding:
        _released_set_seed(cfg.seed)  # ... and train() seeds again before its loop
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)

    # --- the state of the loop: fresh, or from the checkpoint
    state = dict(step=0, epoch=0, pos=0, perm=None, best_state=None, best_score=-1.0, best_step=None,
                 best_epoch=None, best_dev=None, since_best=0, curve={"train": [], "dev": []},
                 epoch_loss=[0.0, 0], eval_loss=[0.0, 0], wall=0.0, finished=False, status="running")
    kb_hash = datasets.kb_hashes(ds.entities, desc_col)
    ck = _resumable(cfg, ckpt_path, run_name, str(features.model_id), device, kb_hash)
    # the negatives' tables take a while on a large KB (no random number is drawn building them): a
    # run that finished earlier only needs its evaluation
    sampler = None if ck is not None and ck["state"].get("finished") else _sampler(cfg, ds, desc_col, train)
    if ck is not None:
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        rng = ck["rng"]
        torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        shuffle_gen.set_state(rng["shuffle"].cpu())
        np_rng.bit_generator.state = json.loads(rng["numpy"])
        if rng.get("negatives") is not None and sampler is not None and hasattr(sampler, "setstate"):
            sampler.setstate(rng["negatives"])
        state.update(ck["state"], curve=json.loads(ck["state"]["curve"]), best_state=ck["best_state"],
                     perm=ck["perm"].cpu() if ck["perm"] is not None else None)
        if state["finished"]:
            print(f"{run_name} finished earlier ({state['status']}): evaluating its selected model")
        else:
            print(f"resuming {run_name} from step {state['step']} "
                  f"(epoch {state['epoch'] + state['pos'] / steps_per_epoch:.2f})")
    else:
        for stale in ("checkpoint.pt", "metrics.json", "model.pt", "predictions.parquet"):
            (run_dir / stale).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    def evaluate_split(sp: _Split, rule: str = cfg.rank_rule) -> tuple[dict, dict]:
        return evaluate_queries(encode(model, inputs, sp.rows), entities, sp.gold, sp.cand, rule, protocols)

    def save_checkpoint() -> None:
        # every random stream and the position in the epoch: a resumed run ends exactly as an uninterrupted one
        rng = {"torch": torch.get_rng_state(), "shuffle": shuffle_gen.get_state(),
               "numpy": json.dumps(np_rng.bit_generator.state),
               "negatives": json.dumps(sampler.getstate()) if hasattr(sampler, "getstate") else None,
               "cuda": torch.cuda.get_rng_state_all() if device.startswith("cuda") else None}
        s = {k: v for k, v in state.items() if k not in ("perm", "best_state")}
        s.update(curve=json.dumps(state["curve"]), wall=state["wall"] + (time.perf_counter() - t_start))
        atomic.write_torch({"format": CHECKPOINT_FORMAT, "code_version": CODE_VERSION,
                            "feature_model": str(features.model_id), "config": json.dumps(cfg.to_dict()),
                            **kb_hash,
                            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "rng": rng, "perm": state["perm"],
                            "best_state": state["best_state"], "state": s}, ckpt_path)

    # --- the loop
    train_rows = torch.as_tensor(train.rows, device=device)
    train_gold = torch.as_tensor(train.gold, device=device)
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
            for _ in range(state["pos"], steps_per_epoch):  # the rest of this epoch
                b = perm[state["pos"] * cfg.batch_size:(state["pos"] + 1) * cfg.batch_size]
                rows, gold = train_rows[b], train_gold[b]
                x = stacked[rows]  # [B, 4, D]: one gather for the four inputs
                batch = {k: x[:, i] for i, k in enumerate(_ARRAYS)}
                batch["image_ok"], batch["cue_ok"] = inputs["image_ok"][rows], inputs["cue_ok"][rows]
                neg = None
                if sampler is not None:
                    idx = sampler.sample(gold.cpu().numpy(), np_rng, rows=b.cpu().numpy(), k=cfg.num_negatives)
                    neg = entities[torch.as_tensor(idx, device=device)]  # [B, D] or [B, K, D]
                loss = compute_loss(cfg.loss, model(batch), entities[gold], neg, gold, l2_reg=cfg.l2_reg,
                                    temperature=cfg.temperature)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    _diverged(f"loss is {lv}", state, cfg, ckpt_path, run_name)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                gnorm = float(torch.nn.utils.clip_grad_norm_(
                    model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf))
                if not math.isfinite(gnorm):
                    _diverged(f"gradient norm is {gnorm}", state, cfg, ckpt_path, run_name)
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
                    state.update(epoch_loss=[0.0, 0], epoch=state["epoch"] + 1, pos=0)
                    bar.set_postfix(loss=f"{state['curve']['train'][-1]['loss']:.3f}")
                    emit({"event": "epoch", **state["curve"]["train"][-1]})
                if due:
                    if released_seeding and isinstance(sampler, ReleasedTfidfSampler):
                        # the released dev set draws a negative as each item loads, at every evaluation
                        sampler.sample(dev.gold, k=cfg.num_negatives)
                    if _evaluate_and_select(state, model, evaluate_split(dev)[0], cfg, steps_per_epoch, emit):
                        state.update(finished=True, status="early_stopped")
                    elif state["epoch"] >= cfg.num_epochs:
                        state.update(finished=True, status="completed")
                    save_checkpoint()
                    if state["finished"]:
                        break
    finally:
        bar.close()

    # --- the selected model on dev and test, under both rank rules: strict is the released rule (ties
    # favour the gold), pessimistic counts ties against it; ``metrics`` is the run's own ``rank_rule``
    if state["best_state"] is not None:
        model.load_state_dict(state["best_state"])
    model.eval()
    by_rule: dict[str, dict] = {rule: {} for rule in RULES}
    ranks, tops = {}, {}
    for split_name, sp in (("dev", dev), ("test", test)):  # one encoding and one scoring pass per split
        q = encode(model, inputs, sp.rows)
        m, r, tops[split_name] = evaluate_rules(q, entities, sp.gold, sp.cand, RULES, protocols, topk=5)
        if tops[split_name] is None and len(sp.rows):  # no 'kb' protocol asked: the top-5 still comes from the KB
            tops[split_name] = kb_ranks(q, entities, sp.gold, cfg.rank_rule, topk=5)[1]
        for rule in RULES:
            by_rule[rule][split_name] = m[rule]
        ranks[split_name] = r[cfg.rank_rule]
    best = {"step": state["best_step"], "epoch": state["best_epoch"],
            f"dev {cfg.select_protocol} H@1": state["best_score"] if state["best_step"] is not None else None}
    result = RunResult(run_name=run_name, run_dir=run_dir, dataset=ds.name, variant=cfg.variant,
                       ablation=cfg.ablation, config=cfg.to_dict(), metrics=by_rule[cfg.rank_rule], best=best,
                       curve=state["curve"], status=state["status"],
                       wall_time_s=state["wall"] + (time.perf_counter() - t_start),
                       feature_model=str(features.model_id), weights_real=bool(features.weights_real),
                       note=_note(ds.name, bool(features.weights_real), missing), counts=counts,
                       inputs_missing=missing, metrics_by_rule=by_rule)
    atomic.write_torch({"config": json.dumps(cfg.to_dict()), "model_config": json.dumps(dataclasses.asdict(mcfg)),
                        "model": {k: v.cpu() for k, v in model.state_dict().items()}}, run_dir / "model.pt")
    _write_predictions(run_dir, ds, {"dev": dev, "test": test}, ranks, tops)
    # the key again: computing the features may have added the image check's columns to mentions.parquet
    _write_metrics(result, cfg, device, _inputs_key(cfg, ds, device) if key is not None else None)
    write_feature_provenance(run_dir, cfg, ds, features, desc_col, kb_hash)  # what dimkit.link needs
    return result


def _inputs_key(cfg: TrainConfig, ds: datasets.Dataset, device: str) -> str:
    """What a run's numbers depend on besides its settings: the dataset's files, the CLIP and the cue
    expert its features come from, their precision, and the training code."""
    from .clip import parse_clip_spec
    from .cues import default_expert
    from .features import resolve_clip_name
    from .images import sha256_file

    root = Path(ds.root)
    files = {f: sha256_file(root / f) for f in ("mentions.parquet", "entities.parquet", "candidates.parquet")
             if (root / f).is_file()}
    return content_hash({"code": CODE_VERSION, "settings": cfg.fingerprint(), "files": files,
                         "clip": parse_clip_spec(resolve_clip_name(ds.name, cfg.clip)).model_id,
                         "expert": default_expert(ds.name),
                         "precision": "fp16" if device.startswith("cuda") else "fp32"})


def _read_back(cfg: TrainConfig, key: str) -> RunResult | None:
    """The finished run of these settings and these very inputs (its ``metrics.json``), or None.

    A rerun of a chain then neither recomputes the features nor evaluates again; any change of the
    dataset, the CLIP, the expert or the code gives another key, and the run is evaluated (or trained).
    """
    base = paths.runs_dir() / cfg.name()
    for folder in [base, *sorted(base.parent.glob(f"{base.name}-missing-*"))]:
        try:
            d = json.loads((folder / "metrics.json").read_text())
        except (OSError, ValueError):
            continue
        if (d.get("inputs_key") == key and d.get("status") in ("completed", "early_stopped")
                and (folder / "model.pt").is_file() and (folder / PROVENANCE_FILE).is_file()):
            return RunResult(run_name=d["run_name"], run_dir=folder, dataset=d["dataset"], variant=d["variant"],
                             ablation=d["ablation"], config=d["config"], metrics=d["metrics"], best=d["best"],
                             curve=d["curve"], status=d["status"], wall_time_s=d["wall_time_s"],
                             feature_model=d["feature_model"], weights_real=d["weights_real"], note=d["note"],
                             counts=d["counts"], inputs_missing=d["inputs_missing"],
                             metrics_by_rule=d["metrics_by_rule"])
    return None


def _evaluate_and_select(state: dict, model: torch.nn.Module, metrics: dict, cfg: TrainConfig,
                         steps_per_epoch: int, emit) -> bool:
    """Record the dev ``metrics``, keep the best weights; True when early stopping says stop."""
    model.train()
    el = state["eval_loss"]
    point = {"epoch": round(state["epoch"] + state["pos"] / steps_per_epoch, 4), "step": state["step"],
             "loss": el[0] / max(el[1], 1), **metrics}
    state["eval_loss"] = [0.0, 0]
    state["curve"]["dev"].append(point)
    score = metrics[cfg.select_protocol]["H@1"]
    if score is not None and score > state["best_score"]:
        state.update(best_state={k: v.detach().clone() for k, v in model.state_dict().items()},
                     best_score=score, best_step=state["step"], best_epoch=point["epoch"],
                     best_dev=json.dumps(metrics), since_best=0)
    else:
        state["since_best"] += 1
    emit({"event": "eval", **point})
    return bool(cfg.patience and state["since_best"] >= cfg.patience)


def _diverged(what: str, state: dict, cfg: TrainConfig, ckpt_path: Path, run_name: str) -> None:
    """Write the run's ``metrics.json`` as diverged and raise :class:`TrainingDiverged`."""
    kept = (f"the last good checkpoint {ckpt_path} is kept" if ckpt_path.exists()
            else "no checkpoint had been written yet")
    msg = (f"training stopped: {what} at step {state['step'] + 1} (epoch {state['epoch'] + 1}) of run {run_name}; "
           f"{kept}. Try a lower lr (now {cfg.lr}) or check the features for NaN/inf values.")
    atomic.write_json({"run_name": run_name, "status": "diverged", "error": msg, "config": cfg.to_dict(),
                       "curve": state["curve"]}, ckpt_path.parent / "metrics.json")
    raise TrainingDiverged(msg)


def _write_predictions(run_dir: Path, ds: datasets.Dataset, splits: dict[str, _Split], ranks: dict,
                       tops: dict) -> None:
    """``predictions.parquet``: per dev and test mention, the gold's rank under each protocol and the top-5."""
    qids = ds.entities["qid"].to_numpy()
    frames = []
    for split_name, sp in splits.items():
        if not len(sp.rows):
            continue
        df = pd.DataFrame({"mention_id": sp.mention_ids, "split": split_name, "qid": qids[sp.gold]})
        for p, r in ranks[split_name].items():
            df[f"rank_{p}"] = r
        df["top5"] = [list(qids[t]) for t in tops[split_name].cpu().numpy()]
        frames.append(df)
    if frames:
        atomic.write_parquet(pd.concat(frames, ignore_index=True), run_dir / "predictions.parquet")


def _write_metrics(result: RunResult, cfg: TrainConfig, device: str, inputs_key: str | None) -> None:
    import platform

    from . import __version__

    protocols = cfg.protocols.split(",")
    atomic.write_json({
        "run_name": result.run_name, "status": result.status, "dataset": result.dataset,
        "variant": result.variant, "ablation": result.ablation,
        "protocol": {p: PROTOCOL_NOTES[p] for p in protocols}, "rank_rule": cfg.rank_rule,
        "rank_rules": RULE_NOTES, "metrics_by_rule": result.metrics_by_rule,
        "procedure": procedure(cfg), "off_preset": off_preset(cfg),
        "selection": f"best dev H@1 ({cfg.select_protocol} protocol) over all evaluations",
        "metrics": result.metrics, "best": result.best, "config": result.config, "seed": cfg.seed,
        "feature_model": result.feature_model, "weights_real": result.weights_real, "note": result.note,
        "wall_time_s": result.wall_time_s, "device": device, "counts": result.counts,
        "inputs_missing": result.inputs_missing, "inputs_key": inputs_key, "curve": result.curve,
        # versions only of what training touches: importing transformers/open_clip here costs seconds
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "dimkit": __version__},
    }, result.run_dir / "metrics.json")


# --------------------------------------------------------------------------------------------
# Feature provenance for dimkit.link: which CLIP, precision, expert and entity texts the run was
# trained on, so new mentions get their features from the very same models.

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


def write_feature_provenance(run_dir: Path, cfg: TrainConfig, ds: datasets.Dataset, features: Any,
                             desc_col: str, kb: dict[str, str] | None = None) -> Path:
    """Write ``runs/<run-name>/features.json`` (read by :mod:`dimkit.link`).

    The CLIP and expert specs are those that make these features again, checked against their model ids;
    a spec that cannot be confirmed (features handed in memory, weights changed since) is None. ``kb``:
    the knowledge base's hashes (:func:`dimkit.datasets.kb_hashes`) when the caller has them.
    """
    from .clip import parse_clip_spec
    from .cues import default_expert
    from .experts import make_expert
    from .features import resolve_clip_name

    meta = dict(getattr(features, "meta", None) or {})  # features built by hand (as in tests) may have none
    model_id = str(features.model_id)
    clip_spec = expert_spec = None
    if "feature_version" in meta:  # made by dimkit.features, not built by hand (as in a test)
        given = resolve_clip_name(ds.name, cfg.clip)
        with contextlib.suppress(DimkitError):
            if parse_clip_spec(given).model_id == model_id:
                clip_spec = _portable_clip_spec(given)
    if meta.get("cue_expert") is not None:
        with contextlib.suppress(DimkitError):
            given = default_expert(ds.name)
            ex = make_expert(given)
            if ex.model_id == meta.get("cue_expert") and ex.version == meta.get("cue_prompt_version"):
                expert_spec = given
    return atomic.write_json({
        "format": PROVENANCE_FORMAT, "dataset": ds.name, "feature_model": model_id,
        "clip_spec": clip_spec, "weights_real": bool(features.weights_real),
        "precision": meta.get("precision"), "feature_version": meta.get("feature_version"),
        "cue_expert": meta.get("cue_expert"), "cue_expert_spec": expert_spec,
        "cue_prompt_version": meta.get("cue_prompt_version"), "synthetic_cues": meta.get("synthetic_cues"),
        "missing_description": meta.get("missing_description", "name"),
        "entity_column": desc_col, "entities": int(len(ds.entities)),
        **(kb or datasets.kb_hashes(ds.entities, desc_col)),
    }, Path(run_dir) / PROVENANCE_FILE)
