"""Expert cues: what an image expert says about each mention image (notebook ``02_expert_cues``).

DIM asks BLIP-2 "Question:  Who are the characters in the picture? Answer: " about every mention
image and CLIP-encodes the answer as a fourth input (the released ``prepare_wikipedia.py::convert_caption``). :func:`run_cues` does this for any
expert of :mod:`dimkit.experts` and any prepared dataset -- WikiDiverse included, which the released
code skips (and then crashes on). Each distinct usable image is asked once; its answer is stored in
``$DIMKIT_CACHE/cues.sqlite`` under (expert model id, prompt version, SHA-256 of the image bytes)
the moment a batch finishes, so an interrupted run resumes where it stopped and a rerun asks
nothing. Mentions whose image is unusable get no cue (``cue_status`` says why) and are counted.

On the bundled sample the default expert is ``sample-oracle``: **synthetic oracle cues** written by
the sample generator, not BLIP-2 output.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from . import atomic, datasets, shards
from .errors import check_positive
from .experts import (NoExpert, CueItem, Expert, ReplayFileExpert, SAMPLE_ORACLE, make_expert)
from .imagefiles import ImageScan, scan_images
from .shards import Shard, in_shard, parse_shard, run_then_assemble, shard_device
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
class CueResult:
    """Cues per mention plus the report; ``cues`` is the contract's Series (mention_id -> text or None)."""

    cues: pd.Series
    table: pd.DataFrame  # mention_id, image, image_sha256, cue, cue_status
    report: CueReport
    expert: Expert


def run_cues(ds: datasets.Dataset | str, expert: str | Expert = "auto", *, prompt: str | None = None,
             device: str = "auto", batch_size: int | None = None, max_new_tokens: int = 20,
             force: bool = False, progress: bool = True, store_path: str | Path | None = None,
             write_report: bool = True, shard: str | tuple[int, int] | Shard | None = None,
             scan: ImageScan | None = None, **expert_options: Any) -> CueResult:
    """Ask ``expert`` about every distinct usable mention image; reuse stored answers; report."""
    t0 = time.perf_counter()
    check_positive({"max_new_tokens": max_new_tokens, "batch_size": batch_size})  # before any work
    if isinstance(ds, str):
        ds = datasets.load(ds)
    expert_name = default_expert(ds.name) if expert == "auto" else expert
    ex = make_expert(expert_name, prompt=prompt, device=shard_device(device), batch_size=batch_size,
                     max_new_tokens=max_new_tokens, **expert_options)
    spec_str = expert_name if isinstance(expert_name, str) else None  # an in-memory expert cannot be rebuilt by name
    shard_t = parse_shard(shard)
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
        with Store(store_path or default_store_path("cues")) as store:
            keys = {sha: cue_key(ex, sha) for sha in items}
            known = {} if force else store.get_many(keys.values())
            todo = []
            for sha, k in keys.items():
                if k in known:
                    answers[sha] = known[k]["cue"]
                    cached += 1
                elif in_shard(sha, shard_t):
                    todo.append(items[sha])
            bs = max(1, int(ex.batch_size or 8))
            from .images import load_image
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
                        else:
                            failures[it.image_sha256] = ans.reason or "model_error"
                            store.put_failure(keys[it.image_sha256], kind=KIND, model=ex.model_id,
                                              version=ex.version, item=it.rel, reason=ans.reason or "model_error",
                                              detail=ans.detail)
                    store.put_many(rows, kind=KIND, model=ex.model_id, version=ex.version)
                    done += len(rows)
                    bar.update(len(batch))

    cue_col, status_col, sha_col = [], [], []
    for rel, status in zip(pm["image"], pm["status"]):
        sha = sha_of.get(rel) if rel else None
        sha_col.append(sha)
        if isinstance(ex, NoExpert):
            cue_col.append(None)
            status_col.append("no_expert")
        elif sha is None:
            cue_col.append(None)
            status_col.append(f"image_{status}")
        elif sha in answers:
            text = answers[sha]
            cue_col.append(text or None)
            status_col.append("ok" if text else "empty_answer")
        elif sha in failures:
            cue_col.append(None)
            status_col.append(failures[sha])
        else:  # another shard's image, not computed by this process
            cue_col.append(None)
            status_col.append("other_shard")
    table = pd.DataFrame({"mention_id": pm["mention_id"], "image": pm["image"], "image_sha256": sha_col,
                          "cue": cue_col, "cue_status": status_col})
    cues = pd.Series(cue_col, index=pd.Index(pm["mention_id"], name="mention_id"), name="cue", dtype=object)

    no_img = Counter(s for s in pm["status"] if s != "ok")
    synthetic = bool(getattr(ex, "synthetic", False))
    note = ex.note if isinstance(ex, ReplayFileExpert) else getattr(ex, "note", "")
    if synthetic:
        note = ("synthetic oracle cues, not comparable to the paper: " + note).strip()
    report = CueReport(
        dataset=ds.name, expert=ex.model_id, expert_spec=spec_str, prompt_version=ex.version,
        prompt=ex.prompt, synthetic=synthetic, mentions=int(len(pm)),
        mentions_with_cue=int(sum(c is not None for c in cue_col)), images=len(items), done=done,
        cached=cached, empty=int(sum(1 for v in answers.values() if not v)),
        failed=dict(sorted(Counter(failures.values()).items())), no_usable_image=dict(sorted(no_img.items())),
        seconds=round(time.perf_counter() - t0, 3), note=note,
        shard=str(shard_t) if shard_t else None)
    if write_report and shard_t is None:
        atomic.write_text(json.dumps(report.to_dict(), indent=1) + "\n", Path(ds.root) / REPORT_FILE)
    return CueResult(cues=cues, table=table, report=report, expert=ex)


def get_cues(ds: datasets.Dataset | str, expert: str | Expert = "auto", **options: Any) -> pd.Series:
    """Cue text per mention (index mention_id, None where there is none), computing what is missing."""
    return run_cues(ds, expert, **options).cues


def show_cues(ds: datasets.Dataset | str, result: CueResult, n: int = 8, *, seed: int = 0,
              include_unusable: bool = True, ncols: int = 4):
    """A grid of mention images beside their cues (one unusable image included when there is one)."""
    from . import plots

    if isinstance(ds, str):
        ds = datasets.load(ds)
    t = result.table.reset_index(drop=True)
    ok = t.index[t["cue_status"] == "ok"].tolist()
    bad = t.index[t["cue_status"].str.startswith("image_") & t["image"].notna()].tolist()
    rng = __import__("random").Random(seed)
    pick = rng.sample(ok, min(len(ok), n - (1 if include_unusable and bad else 0)))
    if include_unusable and bad:
        pick.append(rng.choice(bad))
    rows = ds.mentions.iloc[pick]
    extra = {"cue": [t.loc[i, "cue"] if isinstance(t.loc[i, "cue"], str) and t.loc[i, "cue"]
                     else f"(none: {t.loc[i, 'cue_status']})" for i in pick]}
    label = ("synthetic oracle cues, not BLIP-2" if result.report.synthetic
             else f"cues by {result.report.expert}")
    return plots.mention_grid(ds, rows, extra=extra, ncols=ncols, title=f"{ds.name}: {label}")


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dimkit cues``."""
    parser.add_argument("dataset", help="prepared dataset name (e.g. sample+, wiki+, diverse)")
    parser.add_argument("--expert", default="auto",
                        help="blip2[:ID_OR_FOLDER] (DIM's), hf:ID_OR_FOLDER, vqa:ID_OR_FOLDER, openai:MODEL "
                             "(key from OPENAI_API_KEY), replay:FILE.json, replay:MODEL_ID, sample-oracle, none "
                             "(default: last used, else sample-oracle on the sample and blip2 elsewhere)")
    parser.add_argument("--prompt", default=None, help="prompt (default: DIM's released BLIP-2 prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="generated tokens (DIM: 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per model call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint (else OPENAI_BASE_URL)")
    parser.add_argument("--workers", type=int, default=4, help="parallel requests for openai:")
    shards.add_argument(parser, "images")
    parser.add_argument("--force", action="store_true", help="recompute stored cues")


def run_cli(args: argparse.Namespace) -> int:
    """``dimkit cues NAME``: compute or replay cues and print the report."""
    def run(shard, assembling):
        return run_cues(args.dataset, args.expert, prompt=args.prompt, device=args.device,
                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                        force=args.force and not assembling, base_url=args.base_url, workers=args.workers,
                        shard=shard)

    run_then_assemble(args.shard, run, lambda result: print(result.report))
    return 0
