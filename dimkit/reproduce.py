"""The whole chain for the datasets a user has placed (``make reproduce``, ``dimkit reproduce``).

For each dataset: prepare (from ``$DIMKIT_DATA/raw/<name>`` or ``--source NAME=PATH``), augment or
replay ('+' datasets without a released copy), candidates, expert cues, CLIP features, training
runs (variants x ablations); then the tables (:mod:`dimkit.tables`) and the figure
(:mod:`dimkit.stats`). Every stage stores its work, so a rerun only does what is missing; a training
run whose ``metrics.json`` already says it finished is not trained again.

:func:`check_inputs` runs first and says, per dataset, which inputs are there and which are missing
(the release files, LLM answers or an API key, the BLIP-2 and CLIP weights) and how to supply each;
with anything missing the chain stops before doing any work (``--check`` only prints the list).
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from . import datasets, paths
from .errors import ConfigError, DimkitError

STEPS = ("prepare", "augment", "candidates", "cues", "features", "train", "tables", "figure")

#: Where each dataset comes from; shown when its source is missing.
WHERE_FROM = {
    "wikimel": ("the DIM release (github season1blue/DIM: `wikipedia/` + `ImgData/wikipedia/`; WikiMEL images "
                "from the GHMFC/MELBench release) or MIMIC's cleaned WikiMEL (github pengfei-luo/MIMIC)"),
    "richpediamel": ("the DIM release (`richpedia/` + `ImgData/richpedia/images/`) or MIMIC's cleaned "
                     "RichpediaMEL (rename its `mention_images/` to `mention_image/`)"),
    "wikidiverse": ("the DIM release (`wikidiverse/` + `ImgData/wikidiverse/`, built from WikiDiverse "
                    "'w/ 10 cands') or MIMIC's cleaned WikiDiverse"),
}
PLUS_FROM = "the pre-built {name} from the Google Drive folder linked in DIM's README (DIM release layout)"


def raw_dir(data_dir: str | Path | None = None) -> Path:
    """Where a user places released datasets: ``$DIMKIT_DATA/raw/<name>`` (a folder or a symlink)."""
    return (Path(data_dir) if data_dir is not None else paths.data_dir()) / "raw"


@dataclass
class InputCheck:
    """One input of one dataset: there or missing, and how to supply it."""

    dataset: str
    item: str  # dataset | llm answers | expert | clip
    ok: bool
    detail: str
    fix: str = ""

    def __str__(self) -> str:
        mark = "ok     " if self.ok else "MISSING"
        s = f"[{mark}] {self.dataset:<14} {self.item:<12} {self.detail}"
        return s + (f"\n          -> {self.fix}" if self.fix and not self.ok else "")


@dataclass
class ReproduceConfig:
    """What ``reproduce`` runs; every field has a default that works on the sample."""

    datasets: tuple[str, ...] = ("sample+",)
    variants: tuple[str, ...] = ("paper",)
    ablations: tuple[str, ...] = ("none",)
    steps: tuple[str, ...] = STEPS
    sources: dict = field(default_factory=dict)  # dataset -> source path (else $DIMKIT_DATA/raw/<name>)
    llm_model: str | None = None  # None: sample-oracle on the sample, augment's default elsewhere
    replay: bool | None = None  # None: replay on the sample, live requests elsewhere
    expert: str = "auto"  # cues.default_expert: sample-oracle on the sample, BLIP-2 elsewhere
    clip: str = "auto"  # features.resolve_clip_name: sample CLIP on the sample, ViT-B-32:openai elsewhere
    device: str = "auto"
    num_epochs: int | None = None  # None: the dataset preset's (the released scripts)
    k: int = 100  # candidates per mention
    pick: str = "latest"

    def validate(self) -> "ReproduceConfig":
        """Canonical names, known steps/variants/ablations; raise ConfigError otherwise."""
        from .tables import PICKS

        if not self.datasets:
            raise ConfigError("name at least one dataset (e.g. DATASETS=\"wiki+ rich+\")")
        self.datasets = tuple(dict.fromkeys(datasets.canonical_name(d) for d in self.datasets))
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise ConfigError(f"unknown step {bad[0]!r}; choose from {', '.join(STEPS)}")
        for v in self.variants:
            if v not in ("paper", "released"):
                raise ConfigError(f"unknown variant {v!r}; choose from paper, released")
        known = ("none", "no_image", "no_cue", "no_attention", "text_only", "original_descriptions")
        for a in self.ablations:
            if any(p not in known for p in a.split(",")):
                raise ConfigError(f"unknown ablation {a!r}; choose from {', '.join(known)}")
        if self.pick not in PICKS:
            raise ConfigError(f"pick={self.pick!r} is not one of {', '.join(PICKS)}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError("num_epochs must be >= 1")
        self.sources = {datasets.canonical_name(k): str(v) for k, v in self.sources.items()}
        return self


def _prepared(name: str, data_dir: str | Path | None) -> bool:
    return (datasets.dataset_dir(name, data_dir) / "meta.json").exists()


def _source(name: str, sources: dict, data_dir: str | Path | None) -> Path | None:
    if name in sources:
        return Path(sources[name]).expanduser()
    p = raw_dir(data_dir) / name
    return p if p.exists() else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")


def _check_dataset(name: str, cfg: ReproduceConfig, data_dir, out: list[InputCheck]) -> bool:
    """Append the checks of a dataset's own files; True when it can be had (prepared or preparable)."""
    if _prepared(name, data_dir):
        out.append(InputCheck(name, "dataset", True, f"prepared at {datasets.dataset_dir(name, data_dir)}"))
        return True
    if name == "sample":
        out.append(InputCheck(name, "dataset", True, "the bundled sample (prepared on first use)"))
        return True
    src = _source(name, cfg.sources, data_dir)
    if src is not None:
        ok = src.exists()
        out.append(InputCheck(name, "dataset", ok, f"will prepare from {src}" if ok else f"{src} does not exist",
                              f"place {WHERE_FROM.get(datasets.base_name(name), 'the release')} there"))
        return ok
    if datasets.is_augmented(name):
        return False  # the caller decides: augment from the base dataset
    out.append(InputCheck(name, "dataset", False, f"neither prepared ({datasets.dataset_dir(name, data_dir)}) "
                          f"nor placed ({raw_dir(data_dir) / name})",
                          f"put {WHERE_FROM.get(name, 'the released files')} at {raw_dir(data_dir) / name} "
                          f"(a symlink to the release root works), or pass --source {name}=PATH"))
    return False


def _check_llm(name: str, cfg: ReproduceConfig, data_dir, out: list[InputCheck]) -> None:
    base = datasets.base_name(name)
    replay = cfg.replay if cfg.replay is not None else base == "sample"
    model = cfg.llm_model or ("sample-oracle" if base == "sample" else None)
    if base == "sample" and model == "sample-oracle":
        out.append(InputCheck(name, "llm answers", True, "the sample's synthetic oracle answers (replayed)"))
        return
    if replay:
        if _prepared(base, data_dir):
            try:
                from . import augment

                rep = augment.augment(base, out=name, model=model, dry_run=True, progress=False,
                                      data_dir=data_dir)
                have = rep.cached + rep.imported
                ok = have >= rep.entities
                out.append(InputCheck(name, "llm answers", ok, f"{have} of {rep.entities} answers stored "
                                      f"for model {rep.model}",
                                      f"run without --replay (needs OPENAI_API_KEY) or import answers with "
                                      f"`dimkit augment {base} --answers FILE`"))
            except Exception as exc:  # reported, never hidden
                out.append(InputCheck(name, "llm answers", False, f"cannot count stored answers: {exc}"))
        else:
            out.append(InputCheck(name, "llm answers", True, "replay: stored answers are counted once "
                                  f"{base} is prepared (the run stops naming the first entity without one)"))
        return
    key = bool(os.environ.get("OPENAI_API_KEY"))
    url = os.environ.get("OPENAI_BASE_URL")
    out.append(InputCheck(name, "llm answers", key or bool(url),
                          f"live requests to {url or 'api.openai.com'} (model {model or 'augment default'}); "
                          f"OPENAI_API_KEY {'set' if key else 'not set'}",
                          "export OPENAI_API_KEY=... (or OPENAI_BASE_URL of a local OpenAI-compatible server), "
                          f"or place {PLUS_FROM.format(name=name)} at {raw_dir(data_dir) / name}"))


def _check_expert(name: str, cfg: ReproduceConfig, out: list[InputCheck]) -> None:
    if cfg.expert == "auto":
        expert = "sample-oracle" if datasets.base_name(name) == "sample" else "blip2"
        try:
            from .cues import default_expert

            expert = default_expert(name)
        except Exception:
            pass
    else:
        expert = cfg.expert
    kind, _, rest = expert.partition(":")
    if expert in ("sample-oracle", "oracle", "none") or kind == "replay":
        out.append(InputCheck(name, "expert", True, f"{expert} (no model to load)"))
        return
    if kind == "openai":
        ok = bool(os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"))
        out.append(InputCheck(name, "expert", ok, f"{expert} over the OpenAI API",
                              "export OPENAI_API_KEY (or OPENAI_BASE_URL of a local vision server)"))
        return
    repo = rest or "Salesforce/blip2-opt-2.7b"
    if Path(repo).expanduser().is_dir():
        out.append(InputCheck(name, "expert", True, f"{expert} from the local folder {repo}"))
        return
    if not _offline():
        out.append(InputCheck(name, "expert", True, f"{expert}: {repo} is downloaded on first use "
                              "(BLIP-2 OPT-2.7b: about 15 GB) unless cached"))
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = isinstance(try_to_load_from_cache(repo_id=repo, filename="config.json"), str)
    except Exception:
        hit = False
    out.append(InputCheck(name, "expert", hit, f"{expert}: {repo} " + ("is in the local Hugging Face cache" if hit
                          else "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
                          f"download it where the hub is reachable (`huggingface-cli download {repo}`), or "
                          f"pass --expert blip2:/path/to/folder; cues already stored need no model"))


def _check_clip(name: str, cfg: ReproduceConfig, out: list[InputCheck]) -> None:
    spec_text = cfg.clip
    if spec_text == "auto":
        spec_text = "sample" if datasets.base_name(name) == "sample" else "default"
    try:
        from .clip import _check_cached_offline, parse_clip_spec

        clip = parse_clip_spec(spec_text)
        if clip.weights_real and clip.weights and not Path(clip.weights).exists():
            _check_cached_offline(clip)
        note = "" if clip.weights_real else " (not pretrained: numbers not comparable to the paper)"
        out.append(InputCheck(name, "clip", True, f"{clip.model_id}{note}"))
    except DimkitError as exc:
        out.append(InputCheck(name, "clip", False, str(exc).split(". ")[0],
                              "supply the weights: --clip /path/to/ViT-B-32.pt (OpenAI's file, what DIM used) or "
                              "fill the Hugging Face cache where the hub is reachable"))


def check_inputs(names: Iterable[str] | ReproduceConfig, *, data_dir: str | Path | None = None,
                 **options) -> list[InputCheck]:
    """What each dataset needs and whether it is there; nothing is computed or downloaded."""
    cfg = names if isinstance(names, ReproduceConfig) else ReproduceConfig(datasets=tuple(names), **options)
    cfg.validate()
    out: list[InputCheck] = []
    for name in cfg.datasets:
        have = _check_dataset(name, cfg, data_dir, out)
        if datasets.is_augmented(name) and not have:
            base = datasets.base_name(name)
            sub: list[InputCheck] = []
            base_ok = _check_dataset(base, cfg, data_dir, sub)
            for c in sub:
                out.append(InputCheck(name, "dataset", c.ok, f"to augment: {base} {c.detail}", c.fix))
            if not base_ok:
                out.append(InputCheck(name, "dataset", False, f"no released {name} placed either",
                                      f"or place {PLUS_FROM.format(name=name)} at {raw_dir(data_dir) / name}"))
            if "augment" in cfg.steps:
                _check_llm(name, cfg, data_dir, out)
        if "cues" in cfg.steps or "features" in cfg.steps:
            _check_expert(name, cfg, out)
        if "features" in cfg.steps or "train" in cfg.steps:
            _check_clip(name, cfg, out)
    return out


def format_checks(checks: Sequence[InputCheck]) -> str:
    """The checks as lines, missing ones with how to supply them, and a one-line verdict."""
    lines = [str(c) for c in checks]
    missing = [c for c in checks if not c.ok]
    lines.append(f"{len(missing)} input(s) missing" if missing else "all inputs present")
    return "\n".join(lines)


class MissingInputs(DimkitError):
    """Some inputs of ``reproduce`` are missing; the message lists them and how to supply each."""


@dataclass
class ReproduceReport:
    """What a ``reproduce`` call did, step by step, with timings."""

    checks: list[InputCheck] = field(default_factory=list)
    done: list[tuple[str, str, float, str]] = field(default_factory=list)  # dataset, step, seconds, detail
    runs: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{d:<14} {s:<11} {sec:8.1f} s  {det}" for d, s, sec, det in self.done]
        lines += [f"runs: {', '.join(self.runs) or '(none)'}", f"wrote {len(self.files)} table/figure files"]
        return "\n".join(lines)


def _clip_for(name: str, clip: str) -> str:
    from .features import resolve_clip_name

    return resolve_clip_name(name, clip)


def reproduce(cfg: ReproduceConfig, *, data_dir: str | Path | None = None, progress: bool = True) -> ReproduceReport:
    """Run the chain for ``cfg.datasets``; raise :class:`MissingInputs` (doing nothing) if inputs lack."""
    cfg.validate()
    report = ReproduceReport(checks=check_inputs(cfg, data_dir=data_dir))
    missing = [c for c in report.checks if not c.ok]
    if missing:
        raise MissingInputs("some inputs are missing; nothing was run:\n" + format_checks(report.checks))

    def step(ds: str, name: str, fn) -> object:
        print(f"== {ds}: {name}", flush=True)
        t0 = time.perf_counter()
        res = fn()
        detail = str(res).splitlines()[0] if res is not None else ""
        report.done.append((ds, name, time.perf_counter() - t0, detail[:120]))
        return res

    trained: list[str] = []
    for name in cfg.datasets:
        base = datasets.base_name(name)
        if "prepare" in cfg.steps and not _prepared(name, data_dir):
            src = _source(name, cfg.sources, data_dir)
            if src is not None:
                from .prepare import prepare
                step(name, "prepare", lambda: prepare(src, name=name, data_dir=data_dir))
            elif datasets.is_augmented(name) and not _prepared(base, data_dir):
                bsrc = _source(base, cfg.sources, data_dir)
                if bsrc is not None:
                    from .prepare import prepare
                    step(base, "prepare", lambda: prepare(bsrc, name=base, data_dir=data_dir))
        if "augment" in cfg.steps and datasets.is_augmented(name) and not _prepared(name, data_dir):
            from . import augment
            replay = cfg.replay if cfg.replay is not None else base == "sample"
            model = cfg.llm_model or ("sample-oracle" if base == "sample" else None)
            rep = step(name, "augment", lambda: augment.augment(base, out=name, model=model, replay=replay,
                                                                 data_dir=data_dir, progress=progress))
            if not getattr(rep, "written", False):
                raise DimkitError(f"augment did not write {name}: {rep}")
        ds = datasets.load(name, data_dir)
        if "candidates" in cfg.steps and ds.candidates is None:
            from .candidates import build_candidates
            step(name, "candidates", lambda: build_candidates(ds, k=cfg.k, progress=progress)[1])
        if "cues" in cfg.steps:
            from .cues import run_cues
            step(name, "cues", lambda: run_cues(ds, cfg.expert, device=cfg.device, progress=progress))
        clip = _clip_for(name, cfg.clip)
        if "features" in cfg.steps:
            from .features import compute_features
            step(name, "features", lambda: compute_features(ds, clip, expert=cfg.expert, device=cfg.device,
                                                            progress=progress)[1])
        if "train" in cfg.steps:
            from . import train
            from .tables import FINISHED, read_metrics
            for v in cfg.variants:
                for a in cfg.ablations:
                    if "original_descriptions" in a and not datasets.is_augmented(name):
                        print(f"   skip {name} {a}: only '+' datasets keep the original descriptions")
                        continue
                    tcfg = train.TrainConfig.for_dataset(name, variant=v, ablation=a, clip=clip, device=cfg.device,
                                            num_epochs=cfg.num_epochs)
                    mpath = paths.runs_dir() / tcfg.name() / "metrics.json"
                    if mpath.exists():
                        try:
                            if read_metrics(mpath)["status"] in FINISHED:
                                print(f"   {tcfg.name()}: finished before, not trained again")
                                trained.append(tcfg.name())
                                continue
                        except DimkitError:
                            pass
                    res = step(name, f"train {v}/{a}", lambda: train.run(tcfg, progress=progress))
                    trained.append(res.run_name)
    report.runs = trained
    if "tables" in cfg.steps:
        from . import tables
        built = step("all", "tables", lambda: tables.build_tables(pick=cfg.pick))
        report.files += [str(p) for p in tables.write_tables(built)]
    if "figure" in cfg.steps:
        plus = [d for d in cfg.datasets if datasets.is_augmented(d)]
        if plus:
            from . import stats
            res = step("all", "figure", lambda: stats.figure2(plus, data_dir=data_dir))
            report.files += [str(p) for p in res.files]
    return report


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dimkit reproduce``."""
    d = ReproduceConfig()
    parser.add_argument("datasets", nargs="*", default=list(d.datasets),
                        help="datasets, e.g. wiki+ rich+ diverse+ wikimel (default: sample+)")
    parser.add_argument("--check", action="store_true", help="only list the inputs that are there / missing")
    parser.add_argument("--variants", default="paper", help="comma list: paper, released")
    parser.add_argument("--ablations", default="none",
                        help="comma list (use '+' inside one run to combine): none, no_cue, no_image, "
                             "no_attention, original_descriptions, text_only; 'all' = every one")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=PATH",
                        help="where a released dataset lies (default $DIMKIT_DATA/raw/NAME)")
    parser.add_argument("--model", default=None, help="LLM for the '+' descriptions (augment's default)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--replay", action="store_true", default=None, help="use stored LLM answers only")
    mode.add_argument("--live", action="store_false", dest="replay", default=None,
                      help="request missing LLM answers")
    parser.add_argument("--expert", default="auto", help="image expert (default: BLIP-2; sample-oracle on the sample)")
    parser.add_argument("--clip", default="auto", help="CLIP (default: ViT-B-32:openai; sample CLIP on the sample)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=None, dest="num_epochs", help="override the presets")
    parser.add_argument("--pick", default="latest", help="run chosen for a table cell: latest | best_dev")


def run_cli(args: argparse.Namespace) -> int:
    """``dimkit reproduce``: check the inputs, then run what is missing."""
    ablations = [a.strip().replace("+", ",") for a in args.ablations.split(",") if a.strip()]
    if ablations == ["all"]:
        ablations = ["none", "no_cue", "no_image", "no_attention", "original_descriptions", "text_only"]
    sources = {}
    for s in args.source:
        if "=" not in s:
            raise ConfigError(f"--source expects NAME=PATH, got {s!r}")
        k, v = s.split("=", 1)
        sources[k] = v
    cfg = ReproduceConfig(datasets=tuple(args.datasets), variants=tuple(x for x in args.variants.split(",") if x),
                          ablations=tuple(ablations), steps=tuple(x for x in args.steps.split(",") if x),
                          sources=sources, llm_model=args.model, replay=args.replay, expert=args.expert,
                          clip=args.clip, device=args.device, num_epochs=args.num_epochs, pick=args.pick)
    cfg.validate()
    if args.check:
        checks = check_inputs(cfg)
        print(format_checks(checks))
        return 0 if all(c.ok for c in checks) else 1
    print(reproduce(cfg))
    return 0
