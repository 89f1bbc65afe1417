"""Expert cues: what an image expert says about each mention image (``dimkit cues NAME``, notebook
``02_expert_cues``).

DIM asks BLIP-2 "Question:  Who are the characters in the picture? Answer: " about every mention
image and CLIP-encodes the answer as a fourth input (the released ``prepare_wikipedia.py::convert_caption``);
here any expert of :mod:`dimkit.experts` can answer, on any prepared dataset (WikiDiverse included,
which the released code skips). Each distinct usable image is asked once, and its answer stored in
``$DIMKIT_CACHE/cues.sqlite`` (:mod:`dimkit.store`) as soon as its batch finishes, so a rerun asks
nothing. On the bundled sample the default expert gives **synthetic oracle cues**, not BLIP-2 output.
"""
from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd
from tqdm.auto import tqdm

from . import atomic, datasets, shards
from .errors import ConfigError
from .experts import NOT_ASKED, NoExpert, CueItem, Expert, RELEASED_MAX_NEW_TOKENS, SAMPLE_ORACLE, make_expert
from .images import ImageScan, scan_images
from .shards import Shard, in_shard, run_then_assemble, shard_device
from .stage import Config, Result, load_dataset, setting
from .store import Store, default_store_path, make_key

KIND = "expert_cue"
REPORT_FILE = "reports/cues.json"


def default_expert(ds_name: str) -> str:
    """The expert used when none is named: the last one run on the dataset, else the sample's
    synthetic oracle for ``sample``/``sample+`` and DIM's BLIP-2 for everything else."""
    key = datasets.canonical_name(ds_name)
    root = datasets.dataset_dir(key)
    try:
        last = json.loads((root / REPORT_FILE).read_text()).get("expert_spec")
    except (OSError, ValueError):
        last = None
    if isinstance(last, str) and last:
        return last
    return SAMPLE_ORACLE if datasets.base_name(key) == "sample" else "blip2"


def cue_key(expert: Expert, image_sha256: str) -> str:
    """Store key of one cue: expert model id, prompt version and the image's content hash."""
    return make_key(KIND, expert.model_id, expert.version, {"image_sha256": image_sha256})


#: What ``--expert`` takes (``dimkit cues`` and ``dimkit features``).
EXPERT_HELP = ("blip2[:ID_OR_FOLDER] (DIM's), hf:ID_OR_FOLDER, vqa:ID_OR_FOLDER, openai:MODEL (key from "
               "OPENAI_API_KEY), replay:FILE.json, replay:MODEL_ID, sample-oracle, none; auto: the last one "
               "used, else sample-oracle on the sample and blip2 elsewhere")


@dataclass
class CuesConfig(Config):
    """Which expert ``dimkit cues NAME`` asks about the dataset's mention images, and how."""

    STAGE: ClassVar[str] = "cues"

    dataset: str = setting(None, "prepared dataset name (e.g. sample+, wiki+, diverse)", positional=True)
    expert: str = setting("auto", EXPERT_HELP)
    prompt: str | None = setting(None, "prompt (default: DIM's released BLIP-2 prompt)")
    max_new_tokens: int = setting(RELEASED_MAX_NEW_TOKENS, "generated tokens (DIM: 20)", min=1)
    batch_size: int | None = setting(None, "images per model call (default: the expert's)", min=1)
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, mps")
    base_url: str | None = setting(None, "OpenAI-compatible endpoint (else OPENAI_BASE_URL)")
    workers: int = setting(4, "parallel requests for openai:", min=1)
    shard: str | None = setting("auto", shards.help_text("images"))
    force: bool = setting(False, "recompute stored cues")
    store: Path | None = setting(None, "cue store file (default $DIMKIT_CACHE/cues.sqlite)", cli=False)
    write_report: bool = setting(True, "write reports/cues.json (an unsharded run only)", cli=False)

    def check(self) -> None:
        """A non-empty expert spec and a well-formed shard."""
        if not self.expert.strip():
            raise ConfigError(f"{self.label('expert')} must name an expert ({EXPERT_HELP})")
        shards.check(self.shard)


@dataclass
class CueReport:
    """What a cue run did: distinct images computed / reused / failed by reason, mentions without cue."""

    dataset: str
    expert: str
    expert_spec: str | None
    prompt_version: str
    prompt: str | None
    synthetic: bool
    mentions: int
    mentions_with_cue: int
    images: int
    done: int
    cached: int
    empty: int
    failed: dict[str, int] = field(default_factory=dict)
    no_usable_image: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""
    shard: str | None = None

    def to_dict(self) -> dict:
        """Plain dict (what ``reports/cues.json`` holds)."""
        return asdict(self)

    def __str__(self) -> str:
        label = "synthetic oracle cues (not BLIP-2 output)" if self.synthetic else "model cues"
        lines = [f"cues for {self.dataset}: expert {self.expert} [{self.prompt_version}] -- {label}",
                 f"  mentions: {self.mentions}, with a cue: {self.mentions_with_cue}",
                 f"  distinct usable images: {self.images} (computed now {self.done}, reused {self.cached}, "
                 f"empty answers {self.empty})"]
        if self.failed:
            lines.append("  failed (retried next run): " + ", ".join(f"{k} {v}" for k, v in self.failed.items()))
        if self.no_usable_image:
            lines.append("  mentions without a usable image: "
                         + ", ".join(f"{k} {v}" for k, v in self.no_usable_image.items()))
        if self.shard:
            lines.append(f"  shard {self.shard}: this process's share only (other shards fill the rest of the store)")
        lines.append(f"  {self.seconds:.1f} s")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


@dataclass
class CueResult(Result):
    """Cues per mention plus the report; ``cues`` is the contract's Series (mention_id -> text or None)."""

    cues: pd.Series
    table: pd.DataFrame  # mention_id, image, image_sha256, cue, cue_status
    report: CueReport
    expert: Expert
    next_step: str = ""  # a shard's run: what comes next (set by dimkit.shards)

    def summary(self) -> str:
        """The report, and what comes next after a shard's run."""
        return str(self.report) + (f"\n{self.next_step}" if self.next_step else "")

    @property
    def exit_code(self) -> int:
        """1 when every image the expert was asked about failed: the expert does not work here."""
        r = self.report
        return 1 if r.failed and not (r.done or r.cached or r.empty) else 0

    def to_dict(self) -> dict:
        """The report as a plain dict."""
        return self.report.to_dict()


def run(cfg: CuesConfig, *, dataset: datasets.Dataset | None = None, expert: Expert | None = None,
        progress: bool = True) -> CueResult:
    """Ask the expert about every distinct usable mention image; reuse stored answers; report.

    ``dataset``: the loaded ``cfg.dataset``, when the caller holds it. ``expert``: an expert built in
    Python, asked instead of the spec ``cfg.expert`` (which must then stay ``auto``). With
    ``cfg.shard`` this process computes its share (:mod:`dimkit.shards`).
    """
    cfg = cfg.replace()  # a checked copy
    ds = load_dataset(cfg, dataset)

    def one(shard: Shard | None, assembling: bool) -> CueResult:
        return compute(cfg.replace(force=False) if assembling else cfg, ds, shard=shard, expert=expert,
                       progress=progress)

    return run_then_assemble(cfg.shard, one, lambda result: print(result.summary(), flush=True))


def compute(cfg: CuesConfig, ds: datasets.Dataset, *, shard: Shard | None = None, expert: Expert | None = None,
            scan: ImageScan | None = None, progress: bool = True) -> CueResult:
    """One pass over ``shard`` (None: every image), without :func:`run`'s launch flow; ``scan``: the
    dataset's images, when the caller has checked them already (:mod:`dimkit.features`)."""
    from .images import load_image

    t0 = time.perf_counter()
    if expert is not None and cfg.expert != "auto":
        raise ConfigError(f"two experts given: expert={type(expert).__name__} and the spec {cfg.expert!r}; "
                          "keep one")
    expert_name = expert if expert is not None else default_expert(ds.name) if cfg.expert == "auto" else cfg.expert
    ex = make_expert(expert_name, prompt=cfg.prompt, device=shard_device(cfg.device), batch_size=cfg.batch_size,
                     max_new_tokens=cfg.max_new_tokens, base_url=cfg.base_url, workers=cfg.workers)
    spec_str = expert_name if isinstance(expert_name, str) else None  # an in-memory expert cannot be rebuilt by name
    scan = scan or scan_images(ds, progress=progress)
    pm = scan.per_mention
    sha_of = {rel: f.sha256 for rel, f in scan.files.items() if f.status == "ok"}

    items: dict[str, CueItem] = {}
    for rel in pm["image"]:
        sha = sha_of.get(rel) if rel else None
        if sha and sha not in items:
            items[sha] = CueItem(image_sha256=sha, path=scan.files[rel].path, rel=rel)

    answers: dict[str, str] = {}     # sha -> text ("" for an empty answer)
    failures: dict[str, str] = {}    # sha -> reason
    done = cached = 0
    if not isinstance(ex, NoExpert):
        with Store(cfg.store or default_store_path("cues")) as store:
            keys = {sha: cue_key(ex, sha) for sha in items}
            known = {} if cfg.force else store.get_many(keys.values())
            todo = []
            for sha, k in keys.items():
                if k in known:
                    answers[sha] = known[k]["cue"]
                    cached += 1
                elif in_shard(sha, shard):
                    todo.append(items[sha])
            bs = max(1, int(ex.batch_size or 8))
            bar_kw = {} if progress and todo else {"disable": True}  # else TQDM_DISABLE decides
            with tqdm(total=len(todo), desc=f"cues {ds.name} ({ex.model_id})", unit="img", **bar_kw) as bar:
                for i in range(0, len(todo), bs):
                    batch = todo[i:i + bs]
                    ready = []
                    for it in batch:
                        if ex.needs_pixels:
                            loaded = load_image(it.path)
                            if loaded.image is None:  # changed on disk since the check
                                failures[it.image_sha256] = loaded.status
                                continue
                            it.image = loaded.image
                        ready.append(it)
                    outs = ex.describe(ready) if ready else []
                    rows = []
                    for it, ans in zip(ready, outs):
                        it.image = None
                        if ans.text is not None or ans.reason == "empty_answer":
                            # A model's empty answer is its answer: stored, so a rerun does not ask again.
                            text = ans.text or ""
                            answers[it.image_sha256] = text
                            rows.append((keys[it.image_sha256], {"cue": text}, it.rel))
                        elif ans.reason != NOT_ASKED:
                            failures[it.image_sha256] = reason = ans.reason or "model_error"
                            store.put_failure(keys[it.image_sha256], kind=KIND, model=ex.model_id,
                                              version=ex.version, item=it.rel, reason=reason, detail=ans.detail)
                    store.put_many(rows, kind=KIND, model=ex.model_id, version=ex.version)
                    done += len(rows)
                    bar.update(len(batch))
                    if ex.fatal is not None:  # what was answered is stored; nothing more is asked
                        raise ex.fatal

    sha_col = [sha_of.get(rel) if rel else None for rel in pm["image"]]
    cue_col = [answers.get(sha) or None for sha in sha_col]
    status_col = []
    for sha, status in zip(sha_col, pm["status"]):
        if isinstance(ex, NoExpert):
            status_col.append("no_expert")
        elif sha is None:
            status_col.append(f"image_{status}")
        elif sha in answers:
            status_col.append("ok" if answers[sha] else "empty_answer")
        else:  # a failure, or another shard's image, not computed by this process
            status_col.append(failures.get(sha, "other_shard"))
    table = pd.DataFrame({"mention_id": pm["mention_id"], "image": pm["image"], "image_sha256": sha_col,
                          "cue": cue_col, "cue_status": status_col})
    cues = pd.Series(cue_col, index=pd.Index(pm["mention_id"], name="mention_id"), name="cue", dtype=object)

    no_img = Counter(s for s in pm["status"] if s != "ok")
    synthetic = bool(getattr(ex, "synthetic", False))
    note = getattr(ex, "note", "")
    if synthetic:
        note = ("synthetic oracle cues, not comparable to the paper: " + note).strip()
    report = CueReport(
        dataset=ds.name, expert=ex.model_id, expert_spec=spec_str, prompt_version=ex.version,
        prompt=ex.prompt, synthetic=synthetic, mentions=int(len(pm)),
        mentions_with_cue=int(sum(c is not None for c in cue_col)), images=len(items), done=done,
        cached=cached, empty=sum(1 for v in answers.values() if not v),
        failed=dict(sorted(Counter(failures.values()).items())), no_usable_image=dict(sorted(no_img.items())),
        seconds=round(time.perf_counter() - t0, 3), note=note,
        shard=str(shard) if shard else None)
    if cfg.write_report and shard is None:
        atomic.write_text(json.dumps(report.to_dict(), indent=1) + "\n", Path(ds.root) / REPORT_FILE)
    return CueResult(cues=cues, table=table, report=report, expert=ex)


def get_cues(ds: datasets.Dataset | str, expert: str | Expert = "auto", *, progress: bool = True,
             **settings: Any) -> pd.Series:
    """Cue text per mention (index mention_id, None where there is none), computing what is missing.

    ``expert``: a spec or an Expert; ``settings``: any other :class:`CuesConfig` setting. Every
    mention's cue, even in a process a launcher started (``shard=None`` unless given).
    """
    obj = expert if isinstance(expert, Expert) else None
    cfg = CuesConfig.for_dataset(ds if isinstance(ds, str) else ds.name, **({} if obj else {"expert": expert}),
                                 **settings)
    if "shard" not in settings:
        cfg = cfg.replace(shard=None)
    return run(cfg, dataset=None if isinstance(ds, str) else ds, expert=obj, progress=progress).cues


def show_cues(ds: datasets.Dataset | str, result: CueResult, n: int = 8, *, seed: int = 0,
              include_unusable: bool = True, ncols: int = 4):
    """A grid of mention images beside their cues (one unusable image included when there is one)."""
    from . import plots

    if isinstance(ds, str):
        ds = datasets.load(ds)
    t = result.table.reset_index(drop=True)
    ok = t.index[t["cue_status"] == "ok"].tolist()
    bad = t.index[t["cue_status"].str.startswith("image_") & t["image"].notna()].tolist()
    rng = random.Random(seed)
    pick = rng.sample(ok, min(len(ok), n - (1 if include_unusable and bad else 0)))
    if include_unusable and bad:
        pick.append(rng.choice(bad))
    rows = ds.mentions.iloc[pick]
    extra = {"cue": [t.loc[i, "cue"] if isinstance(t.loc[i, "cue"], str) and t.loc[i, "cue"]
                     else f"(none: {t.loc[i, 'cue_status']})" for i in pick]}
    label = ("synthetic oracle cues, not BLIP-2" if result.report.synthetic
             else f"cues by {result.report.expert}")
    return plots.mention_grid(ds, rows, extra=extra, ncols=ncols, title=f"{ds.name}: {label}")


#: The command line: ``dimkit cues NAME`` takes the flags of :class:`CuesConfig`.
CONFIG = CuesConfig
