"""The whole chain for the datasets a user has placed (``make reproduce``, ``dimkit reproduce``).

For each dataset: prepare (from ``$DIMKIT_DATA/raw/<name or alias>`` or ``--source NAME=PATH``), augment or
replay ('+' datasets without a released copy), candidates, expert cues, CLIP features, training
runs (variants x ablations); then the tables (:mod:`dimkit.tables`) and the figure
(:mod:`dimkit.stats`). Every stage stores its work, so a rerun only does what is missing; a training
run whose settings already finished is not trained again (:func:`dimkit.runs.launch` decides and
trains; a run that fails is reported and the others still run).

:func:`check_inputs` runs first and says, per dataset, which inputs are there and which are missing
(the release files, LLM answers or an API key, the BLIP-2 and CLIP weights) and how to supply each;
with anything missing the chain stops before doing any work (``--check`` only prints the list).
``run(ReproduceConfig(...))`` is the whole of it, ``dimkit reproduce`` its command line.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Iterable, Sequence

from . import augment, candidates, cues, datasets, features, paths, prepare, runs
from .errors import ConfigError, DimkitError, option
from .llm import Endpoint
from .runs import PICKS
from .stage import Config, Result, setting
from .tables import ABLATION_LABELS, VARIANT_LABELS

STEPS = ("prepare", "augment", "candidates", "cues", "features", "train", "tables", "figure")
DEFAULT_DATASETS = ("sample+",)
#: Every ablation a run can have; 'all' on the command line means these.
ABLATIONS = tuple(ABLATION_LABELS)

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
    """Where a user places released datasets: ``$DIMKIT_DATA/raw/<name>`` or ``raw/<alias>``, e.g.
    ``raw/wikimel+`` or ``raw/wiki+`` (a folder or a symlink)."""
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
class ReproduceConfig(Config):
    """What ``reproduce`` runs; every default works on the sample."""

    STAGE: ClassVar[str] = "reproduce"

    # on the command line the datasets are the positional arguments (see add_arguments)
    datasets: tuple[str, ...] = setting(help="datasets, e.g. wiki+ rich+ diverse+ wikimel", cli=False,
                                        factory=lambda: DEFAULT_DATASETS)
    check_only: bool = setting(False, "only list the inputs that are there and missing", cli="--check")
    variants: tuple[str, ...] = setting(help="variants, comma-joined or apart: paper, released (default: paper)",
                                        factory=lambda: ("paper",))
    ablations: tuple[str, ...] = setting(help=f"ablations, comma-joined or apart ('+' joins several into one run, "
                                              f"'all' is every one): {', '.join(ABLATIONS)} (default: none)",
                                         factory=lambda: ("none",))
    steps: tuple[str, ...] = setting(help=f"steps, comma-joined or apart (default: all): {', '.join(STEPS)}",
                                     factory=lambda: STEPS)
    sources: tuple[str, ...] = setting(help="NAME=PATH: where a released dataset lies (default: "
                                            "$DIMKIT_DATA/raw/NAME)", cli="--source", factory=tuple)
    llm_model: str | None = setting(None, "LLM for the '+' descriptions (default: sample-oracle on the sample, "
                                          "augment's default elsewhere)", cli="--model")
    replay: bool | None = setting(None, "use stored LLM answers only (--no-replay: request missing ones; "
                                        "default: replay on the sample only)")
    expert: str = setting("auto", "image expert (auto: BLIP-2; sample-oracle on the sample)")
    clip: str = setting("auto", "CLIP (auto: ViT-B-32:openai; the sample CLIP on the sample)")
    device: str = setting("auto", "auto, cpu, cuda, cuda:N or mps")
    num_epochs: int | None = setting(None, "training epochs (None: the dataset presets)", min=1, cli="--epochs")
    k: int = setting(100, "candidates per mention", min=1)
    pick: str = setting("latest", "the run a table cell shows when several match: latest or best_dev",
                        choices=PICKS)

    def __post_init__(self) -> None:
        if isinstance(self.sources, dict):  # Python callers may hand {name: path}
            self.sources = tuple(f"{k}={v}" for k, v in self.sources.items())

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The generated flags, and the datasets as positional arguments."""
        super().add_arguments(parser)
        # a generated positional takes one value; reproduce takes any number of datasets
        parser.add_argument("datasets", nargs="*", default=list(DEFAULT_DATASETS),
                            help="datasets, e.g. wiki+ rich+ diverse+ wikimel (default: sample+)")

    def check(self) -> None:
        """Canonical dataset names; known steps, variants and ablations; NAME=PATH sources."""
        if not self.datasets:
            how = option('datasets=("wiki+", "rich+")', 'dimkit reproduce wiki+ rich+, or make reproduce DATASETS="wiki+ rich+"')
            raise ConfigError(f"name at least one dataset ({how})")
        self.datasets = tuple(dict.fromkeys(datasets.canonical_name(d) for d in self.datasets))
        self.steps = _items(self.steps)
        self.variants = _items(self.variants)
        ablations = _items(self.ablations)
        self.ablations = ABLATIONS if ablations == ("all",) else ablations
        bad = [s for s in self.steps if s not in STEPS]
        if bad:
            raise ConfigError(f"unknown step {bad[0]!r}; choose from {', '.join(STEPS)}")
        for v in self.variants:
            if v not in VARIANT_LABELS:
                raise ConfigError(f"unknown variant {v!r}; choose from {', '.join(VARIANT_LABELS)}")
        for a in self.ablations:
            if any(p not in ABLATIONS for p in a.split("+")):
                raise ConfigError(f"unknown ablation {a!r}; choose from {', '.join(ABLATIONS)} ('+' joins them)")
        for pair in self.sources:
            if "=" not in pair:
                raise ConfigError(f"{option('sources', '--source')} expects NAME=PATH, got {pair!r}")
        self.sources = tuple(f"{datasets.canonical_name(k)}={v}" for k, v in
                             (pair.split("=", 1) for pair in self.sources))

    @property
    def source_paths(self) -> dict[str, str]:
        """Dataset name -> where its release lies, as given."""
        return dict(pair.split("=", 1) for pair in self.sources)


def _items(values: Sequence[str]) -> tuple[str, ...]:
    """``("paper,released",)`` or ``("paper", "released")`` -> ``("paper", "released")``."""
    return tuple(x.strip() for v in values for x in v.split(",") if x.strip())


def _prepared(name: str, data_dir: str | Path | None) -> bool:
    return (datasets.dataset_dir(name, data_dir) / "meta.json").exists()


def _placed(name: str, data_dir: str | Path | None) -> list[Path]:
    """Where a release of ``name`` may be placed: ``raw/<name>``, then ``raw/<alias>`` for each of its
    aliases (``raw/wikimel+``, ``raw/wiki+``, ``raw/wikimel_plus``)."""
    aliases = [a for a, target in datasets.ALIASES.items() if target == name]
    return [raw_dir(data_dir) / n for n in (name, *aliases)]


def _looked(name: str, data_dir: str | Path | None) -> str:
    """The folders :func:`_source` looks in, for messages."""
    return " or ".join(str(p) for p in _placed(name, data_dir))


def _source(name: str, sources: dict, data_dir: str | Path | None) -> Path | None:
    if name in sources:
        return Path(sources[name]).expanduser()
    return next((p for p in _placed(name, data_dir) if p.exists()), None)


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
    src = _source(name, cfg.source_paths, data_dir)
    if src is not None:
        ok = src.exists()
        out.append(InputCheck(name, "dataset", ok, f"will prepare from {src}" if ok else f"{src} does not exist",
                              f"place {WHERE_FROM.get(datasets.base_name(name), 'the release')} there"))
        return ok
    if datasets.is_augmented(name):
        return False  # the caller decides: augment from the base dataset
    out.append(InputCheck(name, "dataset", False, f"neither prepared ({datasets.dataset_dir(name, data_dir)}) "
                          f"nor placed ({_looked(name, data_dir)})",
                          f"put {WHERE_FROM.get(name, 'the released files')} at {raw_dir(data_dir) / name} "
                          f"(a symlink to the release root works), or pass "
                          f"{option(f'sources={{{name!r}: PATH}}', f'--source {name}=PATH')}"))
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
                rep = augment.augment(base, out=name, model=model, dry_run=True, progress=False,
                                      data_dir=data_dir)
                have = rep.cached + rep.imported
                ok = have >= rep.entities
                out.append(InputCheck(name, "llm answers", ok, f"{have} of {rep.entities} answers stored "
                                      f"for model {rep.model}",
                                      f"run with --no-replay (needs OPENAI_API_KEY) or import answers with "
                                      f"`dimkit augment {base} --answers FILE`"))
            except Exception as exc:  # reported, never hidden
                out.append(InputCheck(name, "llm answers", False, f"cannot count stored answers: {exc}"))
        else:
            out.append(InputCheck(name, "llm answers", True, "replay: stored answers are counted once "
                                  f"{base} is prepared (the run stops naming the first entity without one)"))
        return
    placed = f"or place {PLUS_FROM.format(name=name)} at {raw_dir(data_dir) / name}"
    try:
        endpoint = Endpoint.resolve()
    except ConfigError as exc:  # the message shows the URL redacted
        out.append(InputCheck(name, "llm answers", False, f"live requests: {exc}",
                              f"correct OPENAI_BASE_URL (or unset it for api.openai.com), {placed}"))
        return
    key = bool(endpoint.api_key)  # every endpoint needs one, a local server's too (any non-empty value)
    out.append(InputCheck(name, "llm answers", key,
                          f"live requests to {endpoint.public_url} (model {model or 'augment default'}); "
                          f"OPENAI_API_KEY {'set' if key else 'not set'}",
                          "export OPENAI_API_KEY=... (for a local OpenAI-compatible server named in "
                          f"OPENAI_BASE_URL, any non-empty value such as OPENAI_API_KEY=local), {placed}"))


def _check_expert(name: str, cfg: ReproduceConfig, out: list[InputCheck]) -> None:
    if cfg.expert == "auto":
        expert = "sample-oracle" if datasets.base_name(name) == "sample" else "blip2"
        try:
            expert = cues.default_expert(name)
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
    spec_text = _clip_for(name, cfg.clip)
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
    # unknown options are refused naming the known ones, as every setting is
    cfg = names if isinstance(names, ReproduceConfig) else ReproduceConfig(datasets=tuple(names)).replace(**options)
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
                out.append(InputCheck(name, "dataset", False, f"no released {name} placed either "
                                      f"({_looked(name, data_dir)})",
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
class ReproduceReport(Result):
    """What a ``reproduce`` call did, step by step, with timings; or, with ``check_only``, the checks."""

    checks: list[InputCheck] = field(default_factory=list)
    done: list[tuple[str, str, float, str]] = field(default_factory=list)  # dataset, step, seconds, detail
    runs: list[str] = field(default_factory=list)  # the runs of the chain, trained now or before
    failed: list[tuple[str, str]] = field(default_factory=list)  # run key, why
    files: list[str] = field(default_factory=list)
    check_only: bool = False

    def summary(self) -> str:
        """The checks (``check_only``), or a line per step, the runs, the failures and the files."""
        if self.check_only:
            return format_checks(self.checks)
        lines = [f"{d:<14} {s:<11} {sec:8.1f} s  {det}" for d, s, sec, det in self.done]
        lines += [f"runs: {', '.join(self.runs) or '(none)'}"]
        lines += [f"FAILED {key}: {why}" for key, why in self.failed]
        lines += [f"wrote {len(self.files)} table/figure files"]
        return "\n".join(lines)

    @property
    def exit_code(self) -> int:
        if self.check_only:
            return 0 if all(c.ok for c in self.checks) else 1
        return 1 if self.failed else 0


def _clip_for(name: str, clip: str) -> str:
    return features.resolve_clip_name(name, clip)


def run(cfg: ReproduceConfig, *, data_dir: str | Path | None = None, progress: bool = True) -> ReproduceReport:
    """Run the chain for ``cfg.datasets``; raise :class:`MissingInputs` (doing nothing) if inputs lack.

    With ``check_only`` only the inputs are checked: the report lists them.
    """
    cfg.validate()
    report = ReproduceReport(checks=check_inputs(cfg, data_dir=data_dir), check_only=cfg.check_only)
    if cfg.check_only:
        return report
    missing = [c for c in report.checks if not c.ok]
    if missing:
        raise MissingInputs("some inputs are missing; nothing was run:\n" + format_checks(report.checks))

    def step(ds: str, name: str, fn) -> object:
        print(f"== {ds}: {name}", flush=True)
        t0 = time.perf_counter()
        res = fn()
        detail = (f"{len(res)} tables" if isinstance(res, dict)  # the built tables: their count, not their repr
                  else str(res).splitlines()[0] if res is not None else "")
        report.done.append((ds, name, time.perf_counter() - t0, detail[:120]))
        return res

    trained: list[str] = []
    for name in cfg.datasets:
        base = datasets.base_name(name)
        if "prepare" in cfg.steps and not _prepared(name, data_dir):
            src = _source(name, cfg.source_paths, data_dir)
            if src is not None:
                step(name, "prepare", lambda: prepare.run(prepare.PrepareConfig(src=src, dataset=name,
                                                                                data_dir=data_dir)).root)
            elif datasets.is_augmented(name) and not _prepared(base, data_dir):
                bsrc = _source(base, cfg.source_paths, data_dir)
                if bsrc is not None:
                    step(base, "prepare", lambda: prepare.run(prepare.PrepareConfig(src=bsrc, dataset=base,
                                                                                    data_dir=data_dir)).root)
        if "augment" in cfg.steps and datasets.is_augmented(name) and not _prepared(name, data_dir):
            replay = cfg.replay if cfg.replay is not None else base == "sample"
            model = cfg.llm_model or ("sample-oracle" if base == "sample" else None)
            rep = step(name, "augment", lambda: augment.augment(base, out=name, model=model, replay=replay,
                                                                 data_dir=data_dir, progress=progress))
            if not getattr(rep, "written", False):
                raise DimkitError(f"augment did not write {name}: {rep}")
        ds = datasets.load(name, data_dir)
        if "candidates" in cfg.steps and ds.candidates is None:
            step(name, "candidates", lambda: candidates.run(candidates.CandidatesConfig.for_dataset(ds.name, k=cfg.k),
                                                            dataset=ds, progress=progress))
        # one process does every share: reproduce never waits for other shards
        if "cues" in cfg.steps:
            ccfg = cues.CuesConfig.for_dataset(ds.name, expert=cfg.expert, device=cfg.device).replace(shard=None)
            step(name, "cues", lambda: cues.run(ccfg, dataset=ds, progress=progress))
        clip = _clip_for(name, cfg.clip)
        if "features" in cfg.steps:
            fcfg = features.FeaturesConfig.for_dataset(ds.name, clip=clip, expert=cfg.expert,
                                                       device=cfg.device).replace(shard=None)
            step(name, "features", lambda: features.run(fcfg, dataset=ds, progress=progress).report)
        if "train" in cfg.steps:
            keys = runs.plan([name], cfg.variants, [a.replace("+", ",") for a in cfg.ablations])
            if len(keys) < len(cfg.variants) * len(cfg.ablations):
                print(f"   skip {name} original_descriptions: only '+' datasets keep the original descriptions")
            launched = step(name, "train", lambda: runs.launch(keys, clip=clip, device=cfg.device,
                                                               num_epochs=cfg.num_epochs, progress=progress,
                                                               data_dir=data_dir))
            trained += [launched.run_dir(k).name for k in keys if launched.run_dir(k) is not None]
            report.failed += [(str(k), why) for k, why in launched.failed]
    report.runs = trained
    if "tables" in cfg.steps:
        from . import tables
        found = runs.check_kb(runs.collect(), data_dir)  # runs of an older knowledge base are named, not used
        built = step("all", "tables", lambda: tables.build_tables(runs=found, pick=cfg.pick))
        report.files += [str(p) for p in tables.write_tables(built, left=runs.left_out(found))]
    if "figure" in cfg.steps:
        plus = [d for d in cfg.datasets if datasets.is_augmented(d)]
        if plus:
            from . import stats
            res = step("all", "figure", lambda: stats.figure2(plus, data_dir=data_dir))
            report.files += [str(p) for p in res.files]
    return report


#: The command line: ``dimkit reproduce`` takes the flags of :class:`ReproduceConfig` and runs :func:`run`.
CONFIG = ReproduceConfig
