"""Link new mentions with a trained run (notebook ``06_errors``; ``dimkit link RUN --input FILE --output FILE``).

``link(sentence, mention, image, model=RUN_DIR, k=10)`` ranks the run's whole knowledge base by
cosine score; :class:`Linker` loads a run once to link many. A new mention is encoded as the run's
training mentions were, with the CLIP and the cue expert its ``features.json`` records (never
guessed: one that cannot be loaded, or whose weights changed, is refused); what the stores hold is
read, not recomputed. torch is imported only when a run is loaded.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Sequence

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from . import atomic, datasets, paths, runs
from .clip import load_clip, parse_clip_spec
from .cues import KIND, cue_key
from .env import pick_device
from .errors import ConfigError, DataError, DimkitError
from .experts import NOT_ASKED, CueItem, NoExpert, OpenAIExpert, TransformersExpert, make_expert
from .features import SEP, FeatureStore, _entity_texts, image_key, text_key
from .images import load_image, sha256_file
from .stage import Config, Result, setting
from .store import Store, content_hash, default_store_path

#: Fields every line of a ``dimkit link`` input file must have (without ``image``, linked without an image).
REQUIRED_FIELDS = ("sentence", "mention")
#: What the run folder must hold to be linked with.
RUN_FILES = ("model.pt", "metrics.json", "features.json")
#: What an output line of ``dimkit link`` says about how its mention was encoded (from the result's ``.attrs``).
OUTPUT_DETAILS = ("image_status", "cue", "cue_status", "attention")


# ---------------------------------------------------------------------------------------------
# The run folder


@dataclass
class RunInfo:
    """What a run folder says about the inputs its model was trained on (``features.json``)."""

    run_dir: Path
    run_name: str
    dataset: str
    variant: str
    ablation: str
    feature_model: str
    clip_spec: str | None
    weights_real: bool
    precision: str | None
    feature_version: str | None
    cue_expert: str | None
    cue_expert_spec: str | None
    cue_prompt_version: str | None
    synthetic_cues: bool
    missing_description: str
    entity_column: str
    note: str = ""


def read_run(model: Any) -> RunInfo:
    """Read and check a run folder: finished (:func:`dimkit.runs.read`), with its model and the record
    of its features."""
    run_dir = runs.resolve(model)
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if "model.pt" in missing or "metrics.json" in missing:
        raise DimkitError(f"{run_dir} is not a finished run ({', '.join(missing)} missing); "
                          "train it with `dimkit train` (run again, it continues an interrupted one)")
    rec = runs.read(run_dir).require_finished()
    rerun = f"rerun `dimkit train {rec.dataset}` with the same settings to re-evaluate the run and write it"
    if "features.json" in missing:
        raise DimkitError(f"{run_dir} does not record which CLIP and expert made its features "
                          f"(features.json, written by dimkit.train since `dimkit link` exists); {rerun}")
    src = run_dir / "features.json"
    f = datasets.read_json_file(src, what="the run's features.json", fix=rerun + " again")
    for key in ("dataset", "feature_model", "entity_column"):
        if not f.get(key):
            raise DataError("missing in the run's record of its features", file=src, field=key)
    if f["feature_model"] != rec.feature_model:
        raise DataError(f"feature model {f['feature_model']!r} differs from metrics.json's "
                        f"{rec.feature_model!r}", file=src, field="feature_model")
    return RunInfo(run_dir=run_dir, run_name=rec.run_name, dataset=f["dataset"], variant=str(rec.variant),
                   ablation=rec.ablation, feature_model=f["feature_model"], entity_column=f["entity_column"],
                   weights_real=bool(f.get("weights_real")), synthetic_cues=bool(f.get("synthetic_cues")),
                   missing_description=f.get("missing_description") or "name", note=rec.note,
                   **{k: f.get(k) for k in ("clip_spec", "precision", "feature_version", "cue_expert",
                                            "cue_expert_spec", "cue_prompt_version")})


def _resolve_clip(info: RunInfo):
    """The run's CLIP spec, checked to still be the model that made its features."""
    what = f"run {info.run_name} was trained on features of CLIP {info.feature_model}"
    if not (info.clip_spec and info.precision and info.feature_version):
        raise DimkitError(f"{what}, but its folder does not say how to load that model (the features were "
                          "handed to dimkit.train in memory); train it from dimkit.features to link with it")
    try:
        spec = parse_clip_spec(info.clip_spec)
    except DimkitError as exc:
        raise DimkitError(f"{what} (--clip {info.clip_spec!r}), which is not available here: {exc}") from exc
    if spec.model_id != info.feature_model:
        raise DimkitError(f"{what}, but --clip {info.clip_spec!r} is now {spec.model_id} (its weights "
                          "changed): restore the original weights, or retrain the run on the new features")
    return spec


def _resolve_expert(info: RunInfo, expert: Any = None):
    """The run's cue expert (or ``expert``, which must have the run's model id and prompt version),
    checked to be reachable now rather than at the first new image."""
    what = f"run {info.run_name} was trained on cues of expert {info.cue_expert} [{info.cue_prompt_version}]"
    if expert is None:
        if info.cue_expert is None:
            raise DimkitError(f"run {info.run_name} does not record which expert made its cues")
        if not info.cue_expert_spec:
            raise DimkitError(f"{what}, but its folder does not say how to rebuild that expert; pass it: "
                              "Linker(run, expert=...) or `dimkit link --expert SPEC`")
        expert = info.cue_expert_spec
    try:
        ex = make_expert(expert)
    except DimkitError as exc:
        raise DimkitError(f"{what}; that expert is not available here: {exc}") from exc
    if ex.model_id != info.cue_expert or (info.cue_prompt_version and ex.version != info.cue_prompt_version):
        raise DimkitError(f"{what}, but the expert given is {ex.model_id} [{ex.version}]: cues of another "
                          "expert or prompt are not what the model learned from")
    if isinstance(ex, TransformersExpert) and not ex.local and os.environ.get(
            "HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(repo_id=ex.source, filename="config.json"), str):
            raise DimkitError(
                f"the run's expert {ex.source} is not in the local Hugging Face cache and HF_HUB_OFFLINE "
                f"is set: download it where the hub is reachable (`hf download {ex.source} --local-dir "
                "DIR`) and pass `--expert blip2:DIR` (same model id required), or link only images "
                "whose cues are already stored")
    if isinstance(ex, OpenAIExpert):
        ex._client_or_fail()  # a missing OPENAI_API_KEY is said now
    return ex


# ---------------------------------------------------------------------------------------------
# Inputs


@dataclass
class MentionInput:
    """A new mention to link. ``image``: a file path, an RGB PIL image, a list of paths (Richpedia: the
    vectors are summed, the cue comes from the first), or None for a mention without an image."""

    sentence: str
    mention: str
    image: Any = None
    id: Any = None


@dataclass
class _Image:
    """One mention's images after loading: usable ones with content hashes, or why none is."""

    status: str  # "ok" or the reason of the first image
    detail: str | None = None
    shas: list[str] = field(default_factory=list)
    pil: list = field(default_factory=list)
    cue_source: tuple[str, Any, Path | None] | None = None  # (sha, PIL image, path) of the cue image


def _load_images(image: Any) -> _Image:
    """Load a mention's image(s) with :func:`dimkit.images.load_image`; never raises for a bad file."""
    items = image if isinstance(image, (list, tuple)) else [image]
    items = [x for x in items if x is not None and not (isinstance(x, float) and x != x)]
    if not items:
        return _Image(status="no_image", detail="the mention has no image")
    out = _Image(status="ok")
    failures: list[tuple[str, str | None]] = []  # (status, detail) of each image that cannot be used
    for n, item in enumerate(items):
        path = None
        if isinstance(item, Image.Image):
            rgb = item.convert("RGB")
            # No file bytes to hash: the pixels are the content (a different key space, never a clash).
            sha = hashlib.sha256(b"pil-rgb:%dx%d:" % rgb.size + rgb.tobytes()).hexdigest()
        else:
            path = Path(item).expanduser()
            loaded = load_image(path)
            rgb = loaded.image
            if rgb is None:
                failures.append((loaded.status, loaded.detail))
                continue
            try:
                sha = sha256_file(path)
            except OSError as exc:
                failures.append(("unreadable", str(exc)))
                continue
        out.shas.append(sha)
        out.pil.append(rgb)
        if n == 0:  # the cue is asked about the mention's (first) image, as dimkit.cues does
            out.cue_source = (sha, rgb, path)
    return out if out.shas else _Image(*failures[0])


@dataclass
class Encoded:
    """The model inputs of a batch of new mentions and how each was obtained."""

    features: dict[str, np.ndarray]  # mention, mention_sentence, image, cue [B, D]; image_ok, cue_ok [B]
    image_status: list[str]
    cue: list[str | None]
    cue_status: list[str]
    computed: Counter = field(default_factory=Counter)  # vectors / cues computed now (not stored before)


# ---------------------------------------------------------------------------------------------
# The linker


class Linker:
    """A trained run loaded once: encodes new mentions as its training data was, scores the whole KB.

    ``device``: where the model, the CLIP and the scoring run (``auto``: GPU if there is one).
    ``expert``: only to replace an expert the run folder cannot rebuild; it must have the run's
    expert model id and prompt version. ``lazy``: load the CLIP (and the expert's model) only when a
    vector or cue is not stored yet -- the run's CLIP spec is still checked at once.
    """

    #: Vectors computed here but not written to the store are kept in memory, up to this many, so a
    #: notebook linking the same mention twice encodes it once.
    MEMO_SIZE = 4096

    def __init__(self, model: Any, *, device: str = "auto", expert: Any = None, lazy: bool = False):
        from .train import load_model  # torch: only when a run is loaded

        self.info = read_run(model)
        self.run_dir = self.info.run_dir
        self.device = pick_device(device)
        self.clip_spec = _resolve_clip(self.info)
        try:
            self.model, self.config = load_model(self.run_dir, self.device)
        except DataError as exc:  # say what to do about this run, by its dataset's name
            why = exc.reason.split("; ")[0]
            raise DataError(f"{why}; {runs.damaged_advice(self.info.dataset)}", file=exc.file) from None
        self.uses_cue = bool(self.model.cfg.use_cue)
        self.expert = _resolve_expert(self.info, expert) if self.uses_cue else None
        # Vectors computed here match the stored ones only in the run's precision; fp16 is GPU-only.
        self.precision = self.info.precision if self.device.startswith("cuda") else "fp32"
        self._clip = None
        if not lazy:
            self.clip()
        self.dataset = datasets.load(self.info.dataset)
        ents = self.dataset.entities
        change = runs.kb_change({"run_dir": self.info.run_dir, "run_name": self.info.run_name,
                                 "dataset": self.info.dataset})
        if change is not None:
            raise change
        self._store = None
        self._memo: dict[str, np.ndarray] = {}
        self._set_kb(ents, self._entity_features(ents))

    @classmethod
    def from_parts(cls, model, entities: np.ndarray, kb: pd.DataFrame, *, device: str = "cpu",
                   clip=None, expert=None, info: RunInfo | None = None) -> "Linker":
        """A linker around an in-memory model and entity matrix (benchmarks, experiments)."""
        self = cls.__new__(cls)
        self.info, self.run_dir, self.device = info, None, device
        self.clip_spec, self.config = getattr(clip, "spec", None), None
        self.model = model.to(device).eval()
        self.uses_cue = bool(model.cfg.use_cue)
        self.expert, self._clip, self._store, self.dataset = expert, clip, None, None
        self._memo = {}
        self.precision = getattr(clip, "precision", "fp32")
        self._set_kb(kb, np.asarray(entities, dtype=np.float32))
        return self

    def _set_kb(self, ents: pd.DataFrame, entity: np.ndarray) -> None:
        import torch

        col = self.info.entity_column if self.info is not None else "description"
        self.qids = ents["qid"].astype(str).to_numpy()
        self.names = ents["name"].astype(str).to_numpy() if "name" in ents else self.qids
        desc = ents[col] if col in ents else pd.Series([None] * len(ents))
        self.descriptions = np.array([d if isinstance(d, str) else None for d in desc.tolist()], dtype=object)
        self.entity_index = {q: i for i, q in enumerate(self.qids.tolist())}
        e = torch.as_tensor(np.ascontiguousarray(entity, dtype=np.float32))
        # cosine scores, as the released metric_topk.py ranks: normalised once, one product per mention
        self.entities = torch.nn.functional.normalize(e, dim=-1, eps=1e-12).to(self.device)   # [E, D]

    def clip(self):
        """The run's CLIP, loaded on first use (a missing model is refused with what to supply)."""
        if self._clip is None:
            try:
                self._clip = load_clip(self.clip_spec, device=self.device, precision=self.precision)
            except DimkitError as exc:
                raise DimkitError(f"run {self.info.run_name} needs CLIP {self.info.feature_model}, which "
                                  f"cannot be loaded here: {exc}") from exc
        return self._clip

    def store(self):
        """The feature store of the run's CLIP (vectors keyed by content)."""
        if self._store is None and self.info is not None:
            self._store = FeatureStore(self.info.feature_model)
        return self._store

    def _entity_features(self, ents: pd.DataFrame) -> np.ndarray:
        """The stored entity vectors the run was trained against; any row not stored is computed."""
        info = self.info
        if info.entity_column not in ents.columns:
            raise DataError("the run scored this description column, which the dataset lacks",
                            file=self.dataset.root / "entities.parquet", field=info.entity_column)
        texts, _ = _entity_texts(ents, info.entity_column, info.missing_description)

        def encode(todo: list[str]) -> np.ndarray:
            print(f"{len(todo)} entity texts of run {info.run_name} are not in the feature store "
                  f"({self.store().dir}); computing them with {info.feature_model}")
            return self.clip().encode_texts(todo)

        vectors = self._vectors("text", texts, text_key, encode, Counter(), store_vectors=True)
        return np.stack([vectors[t] for t in texts])                             # [E, D]

    def _vectors(self, kind: str, contents: list, make_key, encode, computed: Counter, store_vectors: bool) -> dict:
        """Vectors of the distinct ``contents``: from the feature store or the memo, the rest encoded now
        (and stored when ``store_vectors``: only in the run's precision do they match the stored ones)."""
        info, store = self.info, self.store()
        distinct = list(dict.fromkeys(c for c in contents if c is not None))
        version = f"{info.feature_version}-{info.precision}"  # as dimkit.features keys the run's vectors
        keys = [make_key(info.feature_model, version, c) for c in distinct]
        got, found = store.gather(keys)
        out = {c: got[i] for i, c in enumerate(distinct) if found[i]}
        out.update({c: self._memo[k] for c, k in zip(distinct, keys) if c not in out and k in self._memo})
        todo = [i for i, c in enumerate(distinct) if c not in out]
        if todo:
            new = encode([distinct[i] for i in todo])                           # [n, D]
            computed[f"{kind} vectors"] += len(todo)
            for i, v in zip(todo, new):
                out[distinct[i]] = v
                if len(self._memo) >= self.MEMO_SIZE:
                    self._memo.pop(next(iter(self._memo)))
                self._memo[keys[i]] = v
            if store_vectors and self.precision == info.precision:
                store.put([keys[i] for i in todo], new)
        return out

    # -- encoding new mentions -----------------------------------------------------------------
    def encode(self, items: Sequence[MentionInput], *, images: Sequence[_Image] | None = None,
               store_vectors: bool = False) -> Encoded:
        """Model inputs of ``items``: stored vectors and cues where they exist, computed otherwise;
        ``store_vectors`` writes the vectors computed here to the store (not for one ``link``: a file a call)."""
        images = list(images) if images is not None else [_load_images(it.image) for it in items]
        computed: Counter = Counter()
        # images: the sum over a mention's usable images (Richpedia), zeros where none is usable
        pil_of = {sha: im for img in images for sha, im in zip(img.shas, img.pil)}
        img_vec = self._vectors("image", [s for img in images for s in img.shas], image_key,
                                lambda shas: self.clip().encode_images([pil_of[s] for s in shas]), computed,
                                store_vectors)
        cues, cue_status = self._cues(images, computed)
        texts = [it.mention for it in items] + [it.mention + SEP + it.sentence for it in items] \
            + [c for c in cues if c]
        txt_vec = self._vectors("text", texts, text_key, lambda ts: self.clip().encode_texts(ts), computed,
                                store_vectors)
        n, dim = len(items), self.entities.shape[1]
        feats = {k: np.zeros((n, dim), dtype=np.float32) for k in ("mention", "mention_sentence", "image", "cue")}
        feats["image_ok"], feats["cue_ok"] = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        for i, (it, img) in enumerate(zip(items, images)):
            feats["mention"][i] = txt_vec[it.mention]
            feats["mention_sentence"][i] = txt_vec[it.mention + SEP + it.sentence]
            if img.shas:
                feats["image"][i] = np.sum([img_vec[s] for s in img.shas], axis=0)
                feats["image_ok"][i] = True
            if cues[i]:
                feats["cue"][i] = txt_vec[cues[i]]
                feats["cue_ok"][i] = True
        return Encoded(features=feats, image_status=[img.status for img in images], cue=cues,
                       cue_status=cue_status, computed=computed)

    def _cues(self, images: Sequence[_Image], computed: Counter) -> tuple[list[str | None], list[str]]:
        """The expert's cue per mention and its status: from the cue store, else asked now (and stored)."""
        ex = self.expert
        if not self.uses_cue or ex is None or isinstance(ex, NoExpert):
            return [None] * len(images), ["not_used" if not self.uses_cue else "no_expert"] * len(images)
        want = {img.cue_source[0]: img.cue_source for img in images if img.cue_source is not None}
        why: dict[str, str] = {}  # image sha -> why it has no cue
        with Store(default_store_path("cues")) as store:
            keys = {sha: cue_key(ex, sha) for sha in want}
            known = store.get_many(keys.values())
            answers = {sha: known[k]["cue"] for sha, k in keys.items() if k in known}  # "": an empty answer
            todo = []
            for sha, (_, pil, path) in want.items():
                if sha in answers:
                    continue
                rel = self._replay_name(path) if not ex.needs_pixels else (str(path) if path else f"<image {sha[:12]}>")
                if rel is None:
                    why[sha] = "not_in_replay"  # a replayed expert knows only the images of its dataset
                    continue
                todo.append(CueItem(image_sha256=sha, path=path or Path(rel), rel=rel, image=pil))
            bs = max(1, int(ex.batch_size or 8))
            for a in range(0, len(todo), bs):
                batch = todo[a:a + bs]
                rows = []
                for it, ans in zip(batch, ex.describe(batch)):
                    it.image = None
                    if ans.text is not None or ans.reason == "empty_answer":
                        answers[it.image_sha256] = ans.text or ""
                        rows.append((keys[it.image_sha256], {"cue": ans.text or ""}, it.rel))
                    elif ans.reason != NOT_ASKED:
                        # recorded as dimkit.cues records it, so reports count it and a rerun retries it
                        why[it.image_sha256] = ans.reason or "model_error"
                        store.put_failure(keys[it.image_sha256], kind=KIND, model=ex.model_id, version=ex.version,
                                          item=it.rel, reason=ans.reason or "model_error", detail=ans.detail)
                if rows:
                    store.put_many(rows, kind=KIND, model=ex.model_id, version=ex.version)
                computed["cues"] += len(rows)
                if ex.fatal is not None:
                    raise ex.fatal
        cues, status = [], []
        for img in images:
            sha = img.cue_source[0] if img.cue_source is not None else None
            cues.append(answers.get(sha) or None)
            if sha is None:
                status.append(f"image_{img.status}")
            elif sha in answers:
                status.append("ok" if answers[sha] else "empty_answer")
            else:
                status.append(why.get(sha, "not_in_store"))
        return cues, status

    def _replay_name(self, path: Path | None) -> str | None:
        """How a replayed expert names an image: its path inside the run's dataset, else unknown."""
        if path is None or self.dataset is None:
            return None
        root = self.dataset.root
        # as written, then resolved: the dataset's image folder may be a symlink (DIMKIT_DATA elsewhere)
        for p, r in ((Path(os.path.abspath(path)), Path(os.path.abspath(root))), (path.resolve(), root.resolve())):
            if p.is_relative_to(r):
                return str(PurePosixPath(*p.relative_to(r).parts))
        return None

    # -- scoring -------------------------------------------------------------------------------
    def query(self, features: dict[str, np.ndarray], *, attention: bool = False):
        """Queries ``[B, D]`` (torch, in the entity space) and, if asked, attention ``[B, K]`` (mean of heads)."""
        import torch

        batch = {k: torch.as_tensor(np.asarray(features[k]), device=self.device)
                 for k in ("mention", "mention_sentence", "image", "cue", "image_ok", "cue_ok")}
        with torch.inference_mode():
            q, w = self.model(batch, return_attention=True)                       # [B, D], [B, heads, K]
        if not attention:
            return q
        return q, (w.mean(1).float().cpu().numpy() if w is not None else None)

    def scores(self, queries) -> "Any":
        """Cosine scores ``[B, E]`` of queries against every KB entity (torch)."""
        import torch

        with torch.inference_mode():
            q = torch.nn.functional.normalize(queries.float(), dim=-1, eps=1e-12)    # [B, D]
            return q @ self.entities.T                                              # [B, E]

    def top_k(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` best entity rows per query and their scores (``[B, k]`` each, best first)."""
        import torch

        s = self.scores(queries)
        k = min(int(k), s.shape[1])
        with torch.inference_mode():
            top = torch.topk(s.nan_to_num(nan=-2.0), k, dim=1)
        return top.indices.cpu().numpy(), top.values.float().cpu().numpy()

    def rank_features(self, features: dict[str, np.ndarray], k: int = 10) -> list[pd.DataFrame]:
        """Top-k tables (qid, name, description, score) of already encoded mentions."""
        q = self.query(features)
        idx, val = self.top_k(q, k)
        return [self._table(i, v) for i, v in zip(idx, val)]

    def _table(self, idx: np.ndarray, val: np.ndarray) -> pd.DataFrame:
        df = pd.DataFrame({"qid": self.qids[idx], "name": self.names[idx], "description": self.descriptions[idx],
                           "score": val.astype(np.float32)})
        df.index = pd.RangeIndex(1, len(df) + 1, name="rank")
        return df

    # -- the public linking calls --------------------------------------------------------------
    def link(self, sentence: str, mention: str, image: Any = None, k: int = 10, *,
             allow_unusable_image: bool = False) -> pd.DataFrame:
        """Top-k entities for one new mention (qid, name, description, score); details in ``.attrs``.

        An image path that cannot be used raises a DataError naming the file and the reason, unless
        ``allow_unusable_image`` (then the image is masked, as for training mentions without one).
        """
        if not isinstance(mention, str) or not mention.strip():
            raise DataError("the mention must be a non-empty string", field="mention")
        if not isinstance(sentence, str):
            raise DataError("the sentence must be a string", field="sentence")
        [result] = self.link_many([MentionInput(sentence, mention, image)], k, store_vectors=False,
                                  allow_unusable_images=allow_unusable_image)
        if isinstance(result, DataError):
            raise DataError(f"{result.reason}; pass allow_unusable_image=True to link without it", file=str(image),
                            field="image")
        return result

    def link_many(self, items: Sequence[MentionInput], k: int = 10, *, store_vectors: bool = True,
                  allow_unusable_images: bool = False) -> list[pd.DataFrame | DataError]:
        """Link a batch of mentions, encoded and scored together; a mention whose image is given but unusable
        (unless allowed) gets a DataError instead, its ``image_status`` saying why."""
        results: list[pd.DataFrame | DataError | None] = [None] * len(items)
        good, images = [], []
        for j, it in enumerate(items):
            img = _load_images(it.image)
            if img.status in ("ok", "no_image") or allow_unusable_images:
                good.append(j)
                images.append(img)
                continue
            error = DataError(f"image unusable ({img.status}{': ' + img.detail if img.detail else ''})",
                              file=str(it.image), record=it.id if it.id is not None else j, field="image")
            error.image_status = img.status  # type: ignore[attr-defined]
            results[j] = error
        if good:
            enc = self.encode([items[j] for j in good], images=images, store_vectors=store_vectors)
            q, w = self.query(enc.features, attention=True)
            idx, val = self.top_k(q, k)
            for n, j in enumerate(good):
                results[j] = self._table(idx[n], val[n])
                results[j].attrs.update(run=self.info.run_name if self.info else None, image_status=enc.image_status[n],
                                        cue=enc.cue[n], cue_status=enc.cue_status[n], computed=dict(enc.computed),
                                        note=self.note)
                if w is not None:  # the attention over the modalities, mean of the heads
                    keys = self.model.key_names
                    results[j].attrs["attention"] = {key: round(float(x), 4) for key, x in zip(keys, w[n])}
            if store_vectors:
                self.store().compact()  # one part file per batch: merged once there are many
        return results  # type: ignore[return-value]

    @property
    def note(self) -> str:
        """What to say beside these scores (random / sample-trained CLIP, synthetic cues)."""
        if self.info is None:
            return ""
        parts = [self.info.note] if self.info.note else []
        if self.info.synthetic_cues and self.uses_cue:
            parts.append("cues are synthetic oracle cues, not BLIP-2 output")
        return "; ".join(parts)

    def __repr__(self) -> str:
        if self.info is None:
            return f"Linker(in memory, {len(self.qids)} entities, device={self.device})"
        return (f"Linker({self.info.run_name}: {self.info.variant}/{self.info.ablation}, {len(self.qids)} "
                f"entities of {self.info.dataset}, CLIP {self.info.feature_model}, expert "
                f"{self.expert.model_id if self.expert is not None else 'unused'}, device={self.device})")


# One linker per run is kept, so a notebook calling link() in a loop loads the run once.
_LINKERS: dict[tuple, Linker] = {}


def get_linker(model: Any, *, device: str = "auto") -> Linker:
    """The :class:`Linker` of a run, loaded on first use and reused while its files are unchanged."""
    if isinstance(model, Linker):
        return model
    run_dir = runs.resolve(model)
    stamp = tuple((run_dir / f).stat().st_mtime_ns if (run_dir / f).exists() else 0 for f in RUN_FILES)
    key = (str(run_dir), stamp, device, str(paths.cache_dir()), str(paths.data_dir()))
    if key not in _LINKERS:
        _LINKERS.clear()  # a run's entity matrix can be large: keep one
        _LINKERS[key] = Linker(run_dir, device=device)
    return _LINKERS[key]


def link(sentence: str, mention: str, image: Any = None, model: Any = None, k: int = 10, *,
         device: str = "auto", allow_unusable_image: bool = False) -> pd.DataFrame:
    """Top-k KB entities (qid, name, description, score) of a new mention under the run ``model``.

    ``model``: a run folder, a run name under ``$DIMKIT_RUNS``, a RunResult or a Linker. ``.attrs`` holds
    the cue, the image status, the attention over modalities (``paper`` variant) and the run's note.
    """
    return get_linker(model, device=device).link(sentence, mention, image, k,
                                                 allow_unusable_image=allow_unusable_image)


# ---------------------------------------------------------------------------------------------
# Batch files (dimkit link RUN --input FILE.jsonl --output FILE.jsonl): LinkConfig -> run -> LinkFileReport


@dataclass
class LinkConfig(Config):
    """Which run links which JSONL file, and how (``dimkit link``)."""

    STAGE: ClassVar[str] = "link"

    run: str = setting(None, "trained run: a folder, or a run name under $DIMKIT_RUNS", positional=True)
    input: Path = setting(None, "UTF-8 JSONL, one mention a line: sentence, mention, and optionally image (a path "
                                "relative to the file's folder, or a list of paths; null or absent: linked without "
                                "an image) and id")
    output: Path = setting(None, "JSONL of results, one line per linked mention")
    k: int = setting(10, "entities per mention", min=1)
    batch_size: int = setting(64, "mentions encoded together", min=1)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, mps")
    expert: str | None = setting(None, "only when the run folder cannot rebuild its expert: a spec with the run's "
                                       "expert model id and prompt version (e.g. blip2:/path/to/local/copy)")
    allow_unusable_images: bool = setting(False, "link lines whose image is given but unusable with the image "
                                                 "masked, instead of skipping them")
    skipped_file: Path | None = setting(None, "where to list skipped lines (default <output stem>.skipped.jsonl)",
                                        cli="--skipped")

    def check(self) -> None:
        """The input, the output and the list of skipped lines are three different files (a symlink
        to another of them counts as that file): writing one must never replace another."""
        files = {"input": self.input, "output": self.output,
                 "skipped_file": self.skipped_file or self.output.with_name(f"{self.output.stem}.skipped.jsonl")}
        seen: dict[Path, str] = {}
        for name, path in files.items():
            real = Path(path).expanduser().resolve()
            if real in seen:
                raise ConfigError(f"{self.label(seen[real])} and {self.label(name)} are the same file ({path}): "
                                  "writing one would replace the other")
            seen[real] = name


@dataclass
class LinkFileReport(Result):
    """What a batch link did: lines linked, and lines skipped with their reasons."""

    run: str
    input: str
    output: str
    lines: int = 0
    linked: int = 0
    no_image: int = 0  # linked lines whose image was null or absent (image and cue masked)
    skipped: list[dict] = field(default_factory=list)  # {"line", "reason", "field", "detail"}
    computed: dict = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    skipped_file: str | None = None

    @property
    def exit_code(self) -> int:
        """1 when the file had lines and none could be linked: a script must not take that for success."""
        return 1 if self.lines and not self.linked else 0

    def reasons(self) -> dict[str, int]:
        """Skipped lines per reason."""
        return dict(Counter(s["reason"] for s in self.skipped).most_common())

    def summary(self) -> str:
        """Lines linked and skipped (the first ten with their reasons), what was computed, the run's note."""
        lines = [f"linked {self.linked} of {self.lines} lines of {self.input} with {self.run} -> {self.output} "
                 f"({self.seconds:.1f} s)"]
        if self.no_image:
            lines.append(f"{self.no_image} of them without an image (image null or absent: linked on the text, "
                         "the image and its cue masked)")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}: " + ", ".join(f"{k} {v}" for k, v in self.reasons().items()))
            for s in self.skipped[:10]:
                lines.append(f"  line {s['line']}: {s['reason']}" + (f" ({s['field']})" if s.get("field") else "")
                             + (f" -- {s['detail']}" if s.get("detail") else ""))
            if len(self.skipped) > 10:
                lines.append(f"  ... {len(self.skipped) - 10} more in {self.skipped_file}")
            elif self.skipped_file:
                lines.append(f"  (all listed in {self.skipped_file})")
        if self.computed:
            lines.append("computed now (not stored before): " + ", ".join(f"{k} {v}" for k, v in self.computed.items()))
        if self.note:
            lines.append(f"note: {self.note}")
        return "\n".join(lines)


def _parse_line(text: str, lineno: int, base: Path) -> MentionInput | dict:
    """One input line -> a MentionInput, or why it is skipped (``line``, ``reason``, ``field``, ``detail``)."""
    def skip(reason: str, name: str | None, detail: str) -> dict:
        return {"line": lineno, "reason": reason, "field": name, "detail": detail}

    try:
        rec = json.loads(text)
    except ValueError as exc:
        return skip("bad_json", None, str(exc)[:200])
    if not isinstance(rec, dict):
        return skip("bad_json", None, "not a JSON object")
    for f in REQUIRED_FIELDS:  # an empty sentence is a sentence; an empty mention is none
        if rec.get(f) is None or (f == "mention" and isinstance(rec[f], str) and not rec[f].strip()):
            return skip("missing_field", f, "absent" if f not in rec else "empty")
    for f in REQUIRED_FIELDS:
        if not isinstance(rec[f], str):
            return skip("bad_field", f, f"expected a string, got {type(rec[f]).__name__}")
    item = MentionInput(sentence=rec["sentence"], mention=rec["mention"], id=rec.get("id", rec.get("mention_id")))
    img = rec.get("image")
    if img is None:
        return item
    imgs = img if isinstance(img, list) else [img]
    if not imgs or not all(isinstance(x, str) and x.strip() for x in imgs):
        return skip("bad_field", "image", "expected a path, a list of paths, or null for no image")
    # Relative image paths are relative to the input file's folder, so a batch folder can move.
    found = [str(base / Path(x).expanduser()) for x in imgs]
    item.image = found if isinstance(img, list) else found[0]
    return item


def _read_lines(src: Path) -> list[tuple[int, str]]:
    """The non-blank lines of a UTF-8 file (a leading byte-order mark is dropped), numbered from 1."""
    data = src.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        line = data.count(b"\n", 0, at) + 1
        raise DataError(f"line {line} (byte offset {at}) is not UTF-8 ({exc.reason}: {data[at:at + 1]!r}); the "
                        "input must be UTF-8 JSON lines: save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 "
                        f"{src.name} > fixed.jsonl` for a Latin-1 file)", file=src) from None
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def link_file(model: Any, input: str | Path, output: str | Path, *, progress: bool = True,
              **settings: Any) -> LinkFileReport:
    """Link every line of a JSONL file with the run ``model`` (a folder, a run name, a RunResult or a
    Linker); ``settings`` are :class:`LinkConfig`'s. ``expert`` may also be an expert object here
    (as for :class:`Linker`) instead of a spec."""
    linker = model if isinstance(model, Linker) else None
    where = getattr(model, "run_dir", None) or ("in-memory model" if linker is not None else model)
    expert = settings.pop("expert") if not isinstance(settings.get("expert"), (str, type(None))) else None
    if expert is not None and linker is not None:
        raise ConfigError("expert= and a Linker given as model: build the Linker with the expert instead")
    cfg = LinkConfig(run=str(where), input=input, output=output).replace(**settings)  # checked before any load
    if expert is not None:
        linker = Linker(cfg.run, device=cfg.device, expert=expert)
    return run(cfg, linker=linker, progress=progress)


def run(cfg: LinkConfig, *, linker: Linker | None = None, progress: bool = True) -> LinkFileReport:
    """Link every line of ``cfg.input``, one JSON line per linked mention out (see :class:`LinkConfig`).

    A bad line (a missing or malformed field, an unusable image) is skipped and reported, never stops
    the batch. ``linker``: the run already loaded (then ``cfg.run``, ``device`` and ``expert`` are unused).
    """
    cfg = cfg.replace()  # a checked copy
    t0 = time.perf_counter()
    src, dst = cfg.input, cfg.output
    if not src.is_file():
        raise DimkitError(f"input file not found: {src}")
    lines = _read_lines(src)
    linker = linker or Linker(cfg.run, device=cfg.device, expert=cfg.expert)
    skipped_path = cfg.skipped_file or dst.with_name(f"{dst.stem}.skipped.jsonl")
    report = LinkFileReport(run=linker.info.run_name if linker.info else "model", input=str(src), output=str(dst),
                            lines=len(lines), note=linker.note, skipped_file=str(skipped_path))
    base = src.parent.resolve()
    computed: Counter = Counter()
    bar_kw = {} if progress else {"disable": True}
    # the output file appears only when the whole batch is linked
    with atomic.replacing(dst, "w", encoding="utf-8") as out, \
            tqdm(total=len(lines), desc=f"linking {src.name}", unit="line", **bar_kw) as bar:
        for a in range(0, len(lines), cfg.batch_size):
            chunk = [(n, _parse_line(text, n, base)) for n, text in lines[a:a + cfg.batch_size]]
            report.skipped += [parsed for _, parsed in chunk if isinstance(parsed, dict)]
            good = [(n, parsed) for n, parsed in chunk if isinstance(parsed, MentionInput)]
            results = linker.link_many([item for _, item in good], cfg.k,
                                       allow_unusable_images=cfg.allow_unusable_images)
            for (n, item), res in zip(good, results):
                if isinstance(res, DataError):
                    report.skipped.append({"line": n, "reason": f"image_{res.image_status}", "field": "image",
                                           "detail": f"{item.image}: {res.reason}"})
                    continue
                computed.update(res.attrs["computed"])
                row = {"line": n, **({"id": item.id} if item.id is not None else {}), "mention": item.mention}
                row.update({k: v for k, v in res.attrs.items() if k in OUTPUT_DETAILS})
                row["entities"] = [dict(e, score=round(e["score"], 6)) for e in res.to_dict("records")]
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                report.linked += 1
                report.no_image += item.image is None
            bar.update(len(chunk))
    report.skipped.sort(key=lambda s: s["line"])
    if report.skipped:
        atomic.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in report.skipped), skipped_path)
    else:
        report.skipped_file = None
        skipped_path.unlink(missing_ok=True)  # a stale list from an earlier batch would mislead
    report.computed = dict(computed)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


#: The command line: ``dimkit link RUN --input FILE --output FILE`` takes the flags of :class:`LinkConfig`.
CONFIG = LinkConfig
