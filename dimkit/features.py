"""CLIP features of mentions, sentences, images, cues and entity descriptions (``dimkit features NAME``,
notebook ``02_expert_cues``): the inputs of the released ``nel_model/prepare_*.py``, raw (not
L2-normalised) float32 CLIP outputs, one :class:`FeatureSet` per dataset for :mod:`dimkit.train`.

Every vector is stored once per model, precision and content (the text, or the image's bytes) in
``$DIMKIT_CACHE/features/<model>/part-*.safetensors``, written durably every ``flush_rows`` rows: an
interrupted run keeps what it computed, a changed description recomputes one row, and a rerun computes
nothing without even loading the model. Several processes may fill one store at once (:mod:`dimkit.shards`).
Only modality-level vectors are computed: neither variant of :mod:`dimkit.model` uses token- or
patch-level features.
"""
from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from . import atomic, datasets, paths, shards
from .clip import ClipModel, ClipSpec, load_clip, parse_clip_spec
from .errors import ConfigError, DataError, DimkitError
from .shards import Shard, in_shard, run_then_assemble, shard_device
from .stage import Config, Result, load_dataset, setting
from .store import content_hash, make_key

#: Bump when the way a vector is computed changes (then nothing stored is reused).
FEATURE_VERSION = "v1"
#: Between mention and sentence in ``mention_sentence``: the literal text, not a CLIP special token.
SEP = " [SEP] "
STORE_FORMAT = "dimkit-features/1"
#: What stands in for a missing description: the entity's name (dimkit) or the released code's
#: literal "None" (its brief.json holds "<name> [SEP]. None" and it encodes the text after "[SEP]. ").
MISSING_DESCRIPTION = ("name", "released")


# ---------------------------------------------------------------------------------------------
# FeatureSet (the contract with training)


def _label(model_id: str, weights_real: bool) -> str:
    if weights_real:
        return f"CLIP {model_id}"
    return f"CLIP {model_id} -- random or sample-trained weights, not comparable to the paper"


@dataclass
class FeatureSet:
    """Frozen CLIP features of one dataset, rows aligned with ``ds.mentions`` / ``ds.entities``."""

    model_id: str
    weights_real: bool
    dim: int
    mention_ids: list[str]
    entity_qids: list[str]
    mention: np.ndarray            # [N, D]
    mention_sentence: np.ndarray   # [N, D] of mention + SEP + sentence
    image: np.ndarray              # [N, D], zeros where unusable; Richpedia: the sum over the mention's images
    image_ok: np.ndarray           # [N] bool
    cue: np.ndarray                # [N, D] of the expert cue (dimkit.cues), zeros where there is none
    cue_ok: np.ndarray             # [N] bool
    entity: np.ndarray             # [E, D] of each entity's description
    entity_original: np.ndarray | None = None  # [E, D] of description_original in '+' datasets (before the LLM)
    meta: dict = field(default_factory=dict)

    ARRAYS = ("mention", "mention_sentence", "image", "image_ok", "cue", "cue_ok", "entity", "entity_original")

    @property
    def label(self) -> str:
        """How to caption numbers built on these features (says when weights are not pretrained)."""
        return _label(self.model_id, self.weights_real)

    def to_dict(self) -> dict[str, Any]:
        """Arrays plus the scalar fields (lists and strings), e.g. for ``np.savez``."""
        out: dict[str, Any] = {k: getattr(self, k) for k in self.ARRAYS if getattr(self, k) is not None}
        out.update(model_id=self.model_id, weights_real=self.weights_real, dim=self.dim,
                   mention_ids=list(self.mention_ids), entity_qids=list(self.entity_qids), meta=self.meta)
        return out

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` file (arrays; ids and meta in its JSON header), atomically."""
        from safetensors.numpy import save

        path = Path(path)
        tensors = {k: np.ascontiguousarray(getattr(self, k)) for k in self.ARRAYS if getattr(self, k) is not None}
        for k in ("image_ok", "cue_ok"):
            tensors[k] = tensors[k].astype(np.uint8)
        header = {"format": "dimkit-featureset/1", "model_id": self.model_id,
                  "weights_real": json.dumps(self.weights_real), "dim": str(self.dim),
                  "mention_ids": json.dumps(list(self.mention_ids)),
                  "entity_qids": json.dumps(list(self.entity_qids)),
                  "meta": json.dumps(self.meta, default=str)}
        atomic.write_bytes(save(tensors, metadata=header), path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as fh:
            header = fh.metadata() or {}
            arrays = {k: fh.get_tensor(k) for k in fh.keys()}
        if header.get("format") != "dimkit-featureset/1":
            raise DataError("not a dimkit FeatureSet file", file=path)
        for k in ("image_ok", "cue_ok"):
            arrays[k] = arrays[k].astype(bool)
        return cls(model_id=header["model_id"], weights_real=json.loads(header["weights_real"]),
                   dim=int(header["dim"]), mention_ids=json.loads(header["mention_ids"]),
                   entity_qids=json.loads(header["entity_qids"]), meta=json.loads(header.get("meta", "{}")), **arrays)

    def summary(self) -> pd.DataFrame:
        """One row per array: shape and how many rows are usable."""
        rows = []
        for k in ("mention", "mention_sentence", "image", "cue", "entity", "entity_original"):
            a = getattr(self, k)
            if a is None:
                continue
            ok = {"image": self.image_ok, "cue": self.cue_ok}.get(k)
            rows.append({"features": k, "shape": tuple(a.shape),
                         "usable rows": int(ok.sum()) if ok is not None else int(len(a))})
        return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The feature store


class FeatureStore:
    """Vectors of one model keyed by content: append-only safetensors part files, read into memory.

    Each part holds ``keys`` (uint8 [n, 32], the SHA-256 store keys) and ``vectors`` (float32 [n, D]).
    A part is written to a temporary name, fsynced and renamed, so a reader never sees half of one;
    processes never write the same file, so they can share a store without locks.
    """

    def __init__(self, model_id: str, root: str | Path | None = None):
        self.model_id = model_id
        readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[:60]
        self.dir = Path(root or paths.cache_dir() / "features") / f"{readable}-{content_hash(model_id)[:8]}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dim: int | None = None
        self._index: dict[bytes, tuple[int, int]] = {}
        self._arrays: list[np.ndarray] = []
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self.refresh()

    def parts(self) -> list[Path]:
        """Part files, oldest first."""
        return sorted(self.dir.glob("part-*.safetensors"))

    def refresh(self) -> None:
        """Index part files written since the last look (by this or another process)."""
        from safetensors import safe_open

        with self._lock:
            for p in self.parts():
                if p.name in self._seen:
                    continue
                try:
                    with safe_open(str(p), framework="numpy") as fh:
                        meta = fh.metadata() or {}
                        keys = fh.get_tensor("keys")
                        vecs = fh.get_tensor("vectors")
                except FileNotFoundError:  # compacted away by another process meanwhile
                    continue
                except Exception as exc:
                    raise DataError(f"unreadable feature part ({exc}); delete it to recompute its rows",
                                    file=p) from exc
                if meta.get("model_id") not in (None, self.model_id):
                    raise DataError(f"feature part of another model ({meta.get('model_id')!r})", file=p)
                if self.dim is None:
                    self.dim = int(vecs.shape[1])
                elif vecs.shape[1] != self.dim:
                    raise DataError(f"feature part has dimension {vecs.shape[1]}, the store {self.dim}", file=p)
                slot = len(self._arrays)
                self._arrays.append(vecs)
                self._seen.add(p.name)
                for row, k in enumerate(keys):
                    self._index[k.tobytes()] = (slot, row)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return bytes.fromhex(key) in self._index

    def gather(self, keys: Sequence[str], dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors ``[len(keys), D]`` (zeros for absent keys) and a found mask."""
        d = dim or self.dim or 0
        out = np.zeros((len(keys), d), dtype=np.float32)
        found = np.zeros(len(keys), dtype=bool)
        for i, k in enumerate(keys):
            hit = self._index.get(bytes.fromhex(k)) if k else None
            if hit is not None:
                out[i] = self._arrays[hit[0]][hit[1]]
                found[i] = True
        return out, found

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> Path | None:
        """Write one part file with these rows (durable when this returns) and index it."""
        if not len(keys):
            return None
        path = self._write(keys, vectors)
        self.refresh()
        return path

    def _write(self, keys: Sequence[str], vectors: np.ndarray) -> Path:
        from safetensors.numpy import save

        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.dim is not None and vectors.shape[1] != self.dim:
            raise DimkitError(f"vectors of dimension {vectors.shape[1]} for a store of dimension {self.dim}")
        key_arr = np.frombuffer(b"".join(bytes.fromhex(k) for k in keys), dtype=np.uint8).reshape(len(keys), 32)
        name = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.safetensors"
        data = save({"keys": key_arr, "vectors": vectors},
                    metadata={"format": STORE_FORMAT, "model_id": self.model_id})
        return atomic.write_bytes(data, self.dir / name)

    def compact(self, max_parts: int = 64, rows_per_part: int = 65_536) -> bool:
        """Merge the parts into parts of ``rows_per_part`` rows when there are more than ``max_parts``
        (fewer files to open). A merged part is written at a time, and the old parts' arrays are let go
        before the new ones are read: memory stays at about one copy of the store."""
        parts = self.parts()
        if len(parts) <= max_parts:
            return False
        self.refresh()
        keys = sorted(self._index)
        for i in range(0, len(keys), rows_per_part):
            chunk = keys[i:i + rows_per_part]
            rows = np.stack([self._arrays[s][r] for s, r in map(self._index.get, chunk)])  # [n, D]
            self._write([k.hex() for k in chunk], rows)
        for p in parts:  # rows of parts written meanwhile by others stay in their own files
            p.unlink(missing_ok=True)
        with self._lock:
            self._index, self._arrays, self._seen = {}, [], set()
        self.refresh()
        return True


# ---------------------------------------------------------------------------------------------
# Computing features


def text_key(model_id: str, version: str, text: str) -> str:
    """Store key of a text's vector: model id, feature version + precision, SHA-256 of the text."""
    return make_key("clip_text", model_id, version, {"text_sha256": content_hash(text.encode("utf-8"))})


def image_key(model_id: str, version: str, image_sha256: str) -> str:
    """Store key of an image's vector: model id, feature version + precision, SHA-256 of the bytes."""
    return make_key("clip_image", model_id, version, {"image_sha256": image_sha256})


@dataclass
class FeatureReport:
    """What a feature run did: rows computed / reused / failed, images and cues per status."""

    dataset: str
    model_id: str
    weights_real: bool
    dim: int
    precision: str
    texts: dict[str, int] = field(default_factory=dict)
    images: dict[str, Any] = field(default_factory=dict)
    mention_images: dict[str, int] = field(default_factory=dict)
    cues: dict[str, Any] = field(default_factory=dict)
    entities: dict[str, int] = field(default_factory=dict)
    model_loaded: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    shard: str | None = None

    def to_dict(self) -> dict:
        """Plain dict (what ``reports/features.json`` holds)."""
        return asdict(self)

    def __str__(self) -> str:
        weights = ("pretrained" if self.weights_real else
                   "NOT pretrained (random or sample-trained): not comparable to the paper")
        t, i, c, e = self.texts, self.images, self.cues, self.entities
        no_desc = f", {e['no_description']} without description" if e["no_description"] else ""
        loaded = "yes" if self.model_loaded else "no (everything was stored)"
        lines = [f"features for {self.dataset}: CLIP {self.model_id} ({weights}), dim {self.dim}, {self.precision}",
                 f"  texts:  {t['distinct']} distinct -- computed {t['done']}, reused {t['cached']}",
                 f"  images: {i['distinct']} distinct usable -- computed {i['done']}, reused {i['cached']}, "
                 f"failed {i['failed'] or 0}",
                 "  mention images: " + ", ".join(f"{k} {v}" for k, v in self.mention_images.items()),
                 f"  cues: {c['with_cue']} of {c['mentions']} mentions "
                 f"(expert {c['expert']}{', SYNTHETIC oracle' if c['synthetic'] else ''})",
                 f"  entities: {e['entities']}{no_desc}",
                 f"  model loaded: {loaded}; {self.seconds:.1f} s"]
        if self.shard:
            lines.append(f"  shard {self.shard}: this process's share only (other shards fill the rest of the store)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


#: Precisions a CLIP can be run in here (open_clip's names); the vectors are stored as float32.
PRECISIONS = ("fp32", "fp16", "bf16")


def _entity_texts(ents: pd.DataFrame, column: str, missing: str) -> tuple[list[str], int]:
    """The text encoded for each entity (``missing``: what stands in for no description), and how many had none."""
    texts, n_missing = [], 0
    for name, desc in zip(ents["name"].tolist(), ents[column].tolist()):
        if isinstance(desc, str) and desc.strip():
            texts.append(desc)
        else:
            n_missing += 1
            texts.append(str(name) if missing == "name" else "None")
    return texts, n_missing


def _encode_texts(cm: ClipModel, store: FeatureStore, todo: list[tuple[str, str]], cfg: "FeaturesConfig",
                  bar_kw: dict) -> None:
    """Encode (key, text) rows into the store, durably every ``flush_rows``."""
    # Similar lengths in one chunk: each CLIP batch is cut to its longest text (ClipModel.trim_text).
    todo = sorted(todo, key=lambda kt: len(kt[1]))
    with tqdm(total=len(todo), desc=f"text features ({cm.model_id})", unit="text", **bar_kw) as bar:
        for i in range(0, len(todo), cfg.flush_rows):
            chunk = todo[i:i + cfg.flush_rows]
            store.put([k for k, _ in chunk], cm.encode_texts([t for _, t in chunk], batch_size=cfg.batch_size))
            bar.update(len(chunk))


def _encode_images(cm: ClipModel, store: FeatureStore, todo: list[tuple[str, Path]], cfg: "FeaturesConfig",
                   bar_kw: dict) -> Counter:
    """Encode (key, path) images into the store; a file unusable now is counted by reason, not raised."""
    import torch
    from concurrent.futures import ThreadPoolExecutor

    from .images import load_image

    def prep(item: tuple[str, Path]):
        loaded = load_image(item[1])
        return item[0], None if loaded.image is None else cm.pixels(loaded.image), loaded.status

    failed: Counter = Counter()
    keys: list[str] = []
    vecs: list[np.ndarray] = []
    step = cfg.image_batch_size
    # Decoding and resizing run in threads (PIL releases the GIL).
    with ThreadPoolExecutor(max_workers=cfg.workers) as pool, \
            tqdm(total=len(todo), desc=f"image features ({cm.model_id})", unit="img", **bar_kw) as bar:
        for i in range(0, len(todo), step):
            batch = list(pool.map(prep, todo[i:i + step]))
            failed.update(why for _, px, why in batch if px is None)
            good = [(k, px) for k, px, _ in batch if px is not None]
            if good:
                vecs.append(cm.encode_pixels(torch.stack([px for _, px in good])))   # [B, D]
                keys += [k for k, _ in good]
            if len(keys) >= cfg.flush_rows:
                store.put(keys, np.concatenate(vecs))
                keys, vecs = [], []
            bar.update(len(batch))
        if keys:
            store.put(keys, np.concatenate(vecs))
    return failed


# ---------------------------------------------------------------------------------------------
# The stage: FeaturesConfig -> run -> FeatureResult


@dataclass
class FeaturesConfig(Config):
    """Which CLIP ``dimkit features NAME`` encodes the dataset with, and how."""

    STAGE: ClassVar[str] = "features"

    dataset: str = setting(None, "prepared dataset name (e.g. sample+, wiki+, diverse)", positional=True)
    clip: str = setting("auto", "default (ViT-B-32:openai, what DIM used), ARCH:TAG, ARCH:random, sample "
                                "(sample-trained, shipped), a checkpoint file or folder, hf-hub:ORG/REPO "
                                "(auto: sample on sample/sample+, else default)")
    expert: str = setting("auto", "cue expert (see `dimkit cues --help`)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, mps")
    precision: str | None = setting(None, "default: fp16 on GPU (as DIM's OpenAI CLIP), fp32 on CPU",
                                    choices=PRECISIONS)
    batch_size: int = setting(64, "texts per CLIP call (sorted by length, so small batches pad little)", min=1)
    image_batch_size: int = setting(64, "images per CLIP call", min=1)
    flush_rows: int = setting(8192, "rows computed between two durable writes to the store (an interrupted "
                                    "run loses at most these)", min=1, cli=False)
    workers: int = setting(2, "image decoding threads", min=1)
    missing_description: str = setting("name", "what stands in for a missing description: the entity's name, "
                                               "or the released code's literal 'None'",
                                       choices=MISSING_DESCRIPTION, cli=False)
    shard: str | None = setting("auto", shards.help_text("rows"))
    save: Path | None = setting(None, "also write the FeatureSet to this .safetensors file")
    force: bool = setting(False, "recompute stored rows")
    store: Path | None = setting(None, "feature store folder (default $DIMKIT_CACHE/features)", cli=False)
    cue_store: Path | None = setting(None, "cue store file (default $DIMKIT_CACHE/cues.sqlite)", cli=False)
    write_report: bool = setting(True, "write reports/features.json (an unsharded run only)", cli=False)

    def check(self) -> None:
        """Non-empty clip and expert specs and a well-formed shard."""
        for name in ("clip", "expert"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{self.label(name)} must not be empty")
        shards.check(self.shard)


@dataclass
class FeatureResult(Result):
    """The dataset's :class:`FeatureSet` and the run's report (and where the set was saved)."""

    features: FeatureSet
    report: FeatureReport
    saved: Path | None = None
    next_step: str = ""  # a shard's run: what comes next (set by dimkit.shards)

    def summary(self) -> str:
        """The report, where the set was saved, and what comes next after a shard's run."""
        lines = [str(self.report)]
        if self.saved is not None:
            lines.append(f"saved {self.saved}")
        if self.next_step:
            lines.append(self.next_step)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """The report as a plain dict (and the saved file)."""
        return {**self.report.to_dict(), "saved": str(self.saved) if self.saved else None}


def run(cfg: FeaturesConfig, *, dataset: datasets.Dataset | None = None, clip: ClipSpec | None = None,
        expert: Any = None, progress: bool = True) -> FeatureResult:
    """Compute what is missing from the feature store and assemble the dataset's FeatureSet and report.

    ``dataset``: the loaded ``cfg.dataset``, when the caller holds it. ``clip`` (a ClipSpec) and ``expert``
    (an Expert) replace the specs ``cfg.clip`` and ``cfg.expert``, which must then stay ``auto``.
    """
    cfg = cfg.replace()  # a checked copy
    ds = load_dataset(cfg, dataset)
    if clip is not None and cfg.clip != "auto":
        raise ConfigError(f"two CLIPs given: clip={clip.model_id!r} and the spec {cfg.clip!r}; keep one")

    def one(shard: Shard | None, assembling: bool) -> FeatureResult:
        result = compute(cfg.replace(force=False) if assembling else cfg, ds, shard=shard, clip=clip, expert=expert,
                         progress=progress)
        if cfg.save is not None and shard is None:
            result.saved = result.features.save(cfg.save)
        return result

    return run_then_assemble(cfg.shard, one, lambda result: print(result.summary(), flush=True))


def compute(cfg: FeaturesConfig, ds: datasets.Dataset, *, shard: Shard | None = None, clip: ClipSpec | None = None,
            expert: Any = None, progress: bool = True) -> FeatureResult:
    """One pass over ``shard`` (None: every row), without :func:`run`'s launch flow (nor ``cfg.save``)."""
    from . import cues as cues_mod
    from .env import pick_device
    from .images import scan_images

    t0 = time.perf_counter()
    clip_spec = clip if clip is not None else parse_clip_spec(resolve_clip_name(ds.name, cfg.clip))
    device = shard_device(cfg.device)
    precision = cfg.precision or ("fp16" if pick_device(device).startswith("cuda") else "fp32")  # as load_clip
    version = f"{FEATURE_VERSION}-{precision}"
    store = FeatureStore(clip_spec.model_id, cfg.store)

    @functools.cache
    def clip_model() -> ClipModel:  # loaded on first need: a run whose rows are all stored never loads it
        return load_clip(clip_spec, device=device, precision=precision)

    scan = scan_images(ds, progress=progress)
    cue_cfg = cues_mod.CuesConfig.for_dataset(ds.name, expert=cfg.expert, device=device, store=cfg.cue_store,
                                              shard=None)
    cue_res = cues_mod.compute(cue_cfg, ds, shard=shard, expert=expert, scan=scan, progress=progress)
    m, ents = ds.mentions, ds.entities
    mention_texts = m["mention"].astype(str).tolist()
    sent_texts = [a + SEP + b for a, b in zip(mention_texts, m["sentence"].astype(str).tolist())]
    cue_texts = [c if isinstance(c, str) and c else None for c in cue_res.cues.tolist()]
    ent_texts, n_missing = _entity_texts(ents, "description", cfg.missing_description)
    orig_texts, n_missing_orig = (None, 0)
    if datasets.is_augmented(ds.name) and "description_original" in ents.columns:
        orig_texts, n_missing_orig = _entity_texts(ents, "description_original", cfg.missing_description)

    all_texts = mention_texts + sent_texts + [c for c in cue_texts if c] + ent_texts + (orig_texts or [])
    tkeys = {t: text_key(clip_spec.model_id, version, t) for t in dict.fromkeys(all_texts)}
    todo_t = [(k, t) for t, k in tkeys.items() if (cfg.force or k not in store) and in_shard(k, shard)]
    cached_t = 0 if cfg.force else sum(k in store for k in tkeys.values())

    files = {rel: f for rel, f in scan.files.items() if f.status == "ok" and f.sha256}
    ikeys = {f.sha256: image_key(clip_spec.model_id, version, f.sha256) for f in files.values()}
    path_of = {f.sha256: f.path for f in files.values()}
    todo_i = [(k, path_of[sha]) for sha, k in ikeys.items() if (cfg.force or k not in store) and in_shard(sha, shard)]
    cached_i = 0 if cfg.force else sum(k in store for k in ikeys.values())

    bar_kw = {} if progress else {"disable": True}
    if todo_t:
        _encode_texts(clip_model(), store, todo_t, cfg, bar_kw)
    failed_i = _encode_images(clip_model(), store, todo_i, cfg, bar_kw) if todo_i else Counter()
    store.refresh()  # pick up rows other shards wrote meanwhile
    store.compact()
    dim = store.dim or clip_model().dim

    def text_block(texts: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        return store.gather([tkeys[t] if t else "" for t in texts], dim)  # zeros and False where None

    mention_v, ok_m = text_block(mention_texts)
    sent_v, ok_s = text_block(sent_texts)
    cue_v, cue_ok = text_block(cue_texts)
    ent_v, ok_e = text_block(ent_texts)
    orig_v = text_block(orig_texts)[0] if orig_texts is not None else None

    # Image per mention: the sum over its usable images (one image except Richpedia's img_list). A usable
    # image whose vector is absent failed now (changed on disk) or belongs to another shard.
    image_v = np.zeros((len(m), dim), dtype=np.float32)
    image_ok = np.zeros(len(m), dtype=bool)
    for row, rels in enumerate(scan.per_mention["images"]):
        keys = [ikeys[files[r].sha256] for r in rels if r in files]
        if keys:
            vecs, found = store.gather(keys, dim)
            if found.any():
                image_v[row] = vecs[found].sum(axis=0)
                image_ok[row] = True

    if shard is None and not (ok_m.all() and ok_s.all() and ok_e.all()):
        raise DimkitError("some text features are missing after computing them; is another process "
                          "compacting the store? rerun `dimkit features`")
    pm_status = Counter(scan.per_mention["status"])
    notes = []
    if not clip_spec.weights_real:
        why = clip_spec.note or "not pretrained"
        notes.append(f"{clip_spec.model_id}: {why}" + ("" if "not comparable" in why else
                     " -- features and every number built on them are not comparable to the paper"))
    if cue_res.report.synthetic:
        notes.append("cues are synthetic oracle cues (sample generator), not BLIP-2 output")
    report = FeatureReport(
        dataset=ds.name, model_id=clip_spec.model_id, weights_real=clip_spec.weights_real, dim=int(dim),
        precision=precision,
        texts={"distinct": len(tkeys), "done": len(todo_t), "cached": cached_t},
        images={"distinct": len(ikeys), "done": len(todo_i) - sum(failed_i.values()), "cached": cached_i,
                "failed": dict(failed_i)},
        mention_images={("usable" if k == "ok" else k): int(v) for k, v in sorted(pm_status.items())},
        cues={"expert": cue_res.report.expert, "synthetic": cue_res.report.synthetic, "mentions": int(len(m)),
              "with_cue": int(cue_ok.sum()), "status": dict(Counter(cue_res.table["cue_status"]))},
        entities={"entities": int(len(ents)), "no_description": n_missing,
                  **({"no_description_original": n_missing_orig} if orig_texts is not None else {})},
        model_loaded=clip_model.cache_info().currsize > 0, seconds=round(time.perf_counter() - t0, 3), notes=notes,
        shard=str(shard) if shard else None)
    fs = FeatureSet(model_id=clip_spec.model_id, weights_real=clip_spec.weights_real, dim=int(dim),
                    mention_ids=m["mention_id"].astype(str).tolist(), entity_qids=ents["qid"].astype(str).tolist(),
                    mention=mention_v, mention_sentence=sent_v, image=image_v, image_ok=image_ok,
                    cue=cue_v, cue_ok=cue_ok, entity=ent_v, entity_original=orig_v,
                    meta={"dataset": ds.name, "precision": precision, "feature_version": FEATURE_VERSION,
                          "cue_expert": cue_res.report.expert, "cue_prompt_version": cue_res.report.prompt_version,
                          "synthetic_cues": cue_res.report.synthetic, "missing_description": cfg.missing_description,
                          "label": _label(clip_spec.model_id, clip_spec.weights_real), "report": report.to_dict()})
    if cfg.write_report and shard is None:
        atomic.write_text(json.dumps(report.to_dict(), indent=1) + "\n", Path(ds.root) / "reports" / "features.json")
    return FeatureResult(features=fs, report=report)


def resolve_clip_name(ds_name: str, clip: str) -> str:
    """``auto``: the shipped sample CLIP on ``sample``/``sample+`` (offline), else DIM's ViT-B-32."""
    if clip != "auto":
        return clip
    return "sample" if datasets.base_name(ds_name) == "sample" else "default"


def load_features(ds_or_name: datasets.Dataset | str, clip: str = "auto", *, progress: bool = True,
                  **settings: Any) -> FeatureSet:
    """The dataset's FeatureSet (what :mod:`dimkit.train` reads): computes missing rows, reuses the store.

    ``clip`` and ``settings``: any :class:`FeaturesConfig` setting; the run's report is in ``fs.meta["report"]``.
    The set is whole even in a process a launcher started (``shard=None`` unless given): training needs every row.
    """
    name = ds_or_name if isinstance(ds_or_name, str) else ds_or_name.name
    cfg = FeaturesConfig.for_dataset(name, clip=clip, **settings)
    if "shard" not in settings:
        cfg = cfg.replace(shard=None)
    return run(cfg, dataset=None if isinstance(ds_or_name, str) else ds_or_name, progress=progress).features


#: The command line: ``dimkit features NAME`` takes the flags of :class:`FeaturesConfig`.
CONFIG = FeaturesConfig


# ---------------------------------------------------------------------------------------------
# A look at the features (notebook 02)


def _unit(a: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(a, axis=-1, keepdims=True)
    return a / np.where(n == 0, 1, n)


def namesake_hits(ds: datasets.Dataset, fs: FeatureSet, split: str = "test") -> pd.DataFrame:
    """How often each mention-side vector is closest (cosine) to its gold entity among the entities
    sharing the gold's name -- the ambiguity DIM's image and cue inputs are meant to resolve.

    Rows: query (mention, mention_sentence, image, cue) x entity text (description, and
    description_original in '+' datasets); ``hit@1`` over the mentions of ``split`` that have a gold
    entity with namesakes and a usable query vector; ``chance`` is the mean of 1 / group size.
    """
    m = ds.mentions.reset_index(drop=True)
    ents = ds.entities.reset_index(drop=True)
    row_of = {q: i for i, q in enumerate(fs.entity_qids)}
    groups = ents.groupby("name").indices
    sel = [i for i in np.flatnonzero((m["split"] == split).to_numpy())
           if isinstance(m.at[i, "qid"], str) and m.at[i, "qid"] in row_of]
    tables = [("description", fs.entity)]
    if fs.entity_original is not None:
        tables.append(("description_original", fs.entity_original))
    rows = []
    for query in ("mention", "mention_sentence", "image", "cue"):
        q = _unit(getattr(fs, query))
        ok = {"image": fs.image_ok, "cue": fs.cue_ok}.get(query, np.ones(len(q), bool))
        for label, table in tables:
            t = _unit(table)
            hits, chance, n = 0, 0.0, 0
            for i in sel:
                gold = row_of[m.at[i, "qid"]]
                group = groups[ents.at[gold, "name"]]
                if len(group) < 2 or not ok[i]:
                    continue
                sims = t[group] @ q[i]
                hits += int(group[int(np.argmax(sims))] == gold)
                chance += 1 / len(group)
                n += 1
            rows.append({"query": query, "entity text": label, "mentions": n,
                         "hit@1": round(hits / n, 3) if n else float("nan"),
                         "chance": round(chance / n, 3) if n else float("nan")})
    out = pd.DataFrame(rows)
    out.attrs["label"] = fs.label
    return out


def write_summary(ds: datasets.Dataset, cue_report: Any, feature_report: FeatureReport,
                  hits: pd.DataFrame | None = None, folder: str | Path | None = None) -> Path:
    """Headline numbers of the cue + feature stage as JSON in ``runs/02_expert_cues/<dataset>.json``."""
    folder = Path(folder) if folder is not None else paths.runs_dir() / "02_expert_cues"
    data = {"dataset": ds.name, "cues": cue_report.to_dict(), "features": feature_report.to_dict(),
            "namesake_hits": hits.to_dict(orient="records") if hits is not None else None,
            "label": _label(feature_report.model_id, feature_report.weights_real)}
    return atomic.write_text(json.dumps(data, indent=1, default=str) + "\n", folder / f"{ds.name}.json")
