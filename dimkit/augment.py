"""Build the '+' datasets: ask an LLM "Who is ...?" about every entity (notebook ``01_augment``;
``dimkit augment NAME``).

DIM's first contribution (the paper's Wiki+, Rich+, Diverse+) replaces each KB entity's static description
with a fresher, richer one written by ChatGPT. The released code ships only the finished files; this
module makes the step itself reliable and cheap to rerun. ``run(AugmentConfig) -> AugmentReport``:

- the prompt is a named, versioned :class:`Template` (``who-is@1``, modelled on the paper's
  "Who is ...?" question); :func:`register_template` adds more;
- every answer is stored the moment it arrives in :class:`dimkit.store.Store` under
  (model, template version, entity + rendered prompt), so a rerun sends no request for a stored
  entity and ``kill -9`` loses at most the requests in flight;
- requests go to any OpenAI-compatible endpoint through :class:`dimkit.llm.ChatClient`, from
  ``concurrency`` worker threads: the openai client retries 429s (after ``Retry-After``), 5xx,
  timeouts and dropped connections; a malformed or empty answer is asked again up to
  ``max_attempts`` times and is never a description; what still fails is recorded with its reason,
  the run goes on, and a rerun asks for it again; a rejected key, an unknown model or a spent
  quota (a 429 ``insufficient_quota``, not retried) stops the run at once, keeping what is stored;
- ``batch=True`` sends what is missing through the OpenAI Batch API instead (half the price);
  submitted batches are recorded in the store, so an interrupted run resumes them; a batch the
  endpoint answers 404 for is marked lost and its entities are asked again; a live run or dry run
  leaves out the entities a pending batch covers (the report names the batch);
- ``replay`` never calls anything and fails naming the first entity without a stored answer;
  ``dry_run`` counts and estimates tokens and cost without calling anything;
- the bundled sample ships synthetic "oracle" answers (``llm_answers.json``) that are imported as
  model ``sample-oracle``, so the notebook runs offline with zero requests and says the
  descriptions are synthetic wherever they appear.

The output is a prepared dataset (default ``<name>+``) beside the source, with ``description``
(the answer), ``description_original`` and ``description_source`` in ``entities.parquet``;
mentions and candidates are copied, and the source's image folders are linked in (see
:func:`link_images`).
"""
from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import queue
import re
import string
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import pandas as pd
from tqdm.auto import tqdm

from . import atomic, datasets, paths
from .errors import ConfigError, DataError, DimkitError, option
from .images import sha256_file as imagefile_sha256
from .llm import (BATCH_FINAL, QUOTA_CODE, BatchNotFound, ChatClient, Completion, Endpoint, LLMError, estimate_cost,
                  estimate_prompt_tokens, parse_completion, status_reason)
from .stage import Config, Result, setting
from .store import Store, content_hash, default_store_path, make_key

#: Store kind of LLM-written entity descriptions.
KIND = "llm_description"
#: Store kind of submitted Batch API jobs, so a rerun resumes polling instead of submitting again.
BATCH_KIND = "llm_batch"
#: A cheap, capable default for real runs; any model the endpoint serves works.
DEFAULT_MODEL = "gpt-4o-mini"
#: The model id under which the sample's synthetic answers are stored.
SAMPLE_ORACLE = "sample-oracle"
#: The data folder's subfolder where released datasets are placed (``dimkit reproduce``): never an output.
RAW_FOLDER = "raw"
#: File of stored answers shipped beside a dataset's source (the bundled sample has one).
ANSWERS_FILE = "llm_answers.json"

_FIELDS = ("name", "qid", "qid_hint", "description")
_WIKIDATA_QID = re.compile(r"Q[1-9][0-9]*")


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """A named, versioned chat prompt about one entity.

    ``user`` (and ``system``) may use ``{name}``, ``{qid}``, ``{qid_hint}`` (" (Wikidata Q42)" when the
    id is a Wikidata QID, else empty: WikiDiverse keys are Wikipedia titles) and ``{description}``
    (the dataset's original description, or "no description"). Changing any text or setting needs
    a new version: stored answers are keyed by ``name@version``.
    """

    name: str
    version: int
    user: str
    system: str | None = None
    max_tokens: int = 200
    temperature: float = 0.0
    note: str = ""

    @property
    def id(self) -> str:
        """``name@version``, the template part of every store key."""
        return f"{self.name}@{self.version}"

    def render(self, qid: str, name: str, description: str | None = None) -> list[dict]:
        """The chat messages for one entity."""
        values = {
            "name": name,
            "qid": qid,
            "qid_hint": f" (Wikidata {qid})" if _WIKIDATA_QID.fullmatch(qid or "") else "",
            "description": description if description else "no description",
        }
        messages = []
        if self.system:
            messages.append({"role": "system", "content": self.system.format_map(values)})
        messages.append({"role": "user", "content": self.user.format_map(values)})
        return messages


_TEMPLATES: dict[str, dict[int, Template]] = {}


def register_template(template: Template) -> Template:
    """Add a template to the registry (re-registering the same id with other content is an error)."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", template.name):
        raise ConfigError(f"template name {template.name!r}: use lower-case letters, digits, '-', '_'")
    if not isinstance(template.version, int) or template.version < 1:
        raise ConfigError(f"template {template.name!r}: version must be a positive int")
    for text in (template.user, template.system or ""):
        for _, fname, _, _ in string.Formatter().parse(text):
            if fname is not None and fname not in _FIELDS:
                raise ConfigError(f"template {template.id}: unknown placeholder {{{fname}}}; "
                                  f"allowed: {', '.join('{' + f + '}' for f in _FIELDS)}")
    old = _TEMPLATES.get(template.name, {}).get(template.version)
    if old is not None and old != template:
        raise ConfigError(f"template {template.id} is already registered with other content; "
                          "bump the version instead (stored answers are keyed by it)")
    _TEMPLATES.setdefault(template.name, {})[template.version] = template
    return template


def get_template(template: str | Template) -> Template:
    """A template by ``name@version`` or by ``name`` (its latest version)."""
    if isinstance(template, Template):
        return register_template(template)
    name, _, version = str(template).partition("@")
    versions = _TEMPLATES.get(name)
    if not versions:
        raise ConfigError(f"unknown template {template!r}; known: {', '.join(list_templates())}")
    if not version:
        return versions[max(versions)]
    try:
        return versions[int(version)]
    except (ValueError, KeyError):
        raise ConfigError(f"unknown template version {template!r}; known: {', '.join(list_templates())}") from None


def list_templates() -> list[str]:
    """Every registered ``name@version``."""
    return [f"{n}@{v}" for n in sorted(_TEMPLATES) for v in sorted(_TEMPLATES[n])]


# The paper's question is "Who is ...?" about each entity (its exact wording is not published).
# Asking for distinguishing facts is what makes the answers useful for disambiguation.
register_template(Template(
    name="who-is", version=1,
    system="You are an encyclopedic assistant. Answer with verifiable facts only.",
    user=("Who is {name}{qid_hint}? Answer in two to four sentences with the facts that identify "
          "this entity and set it apart from others with the same name."),
    note="DIM's 'Who is ...?' question about the entity, with its Wikidata id where known.",
))
register_template(Template(
    name="who-is-kb", version=1,
    system="You are an encyclopedic assistant. Answer with verifiable facts only.",
    user=("Who is {name}{qid_hint}? The knowledge base describes it as: \"{description}\". Answer in two "
          "to four sentences with up-to-date facts that identify this entity and set it apart from "
          "others with the same name."),
    note="Variant that shows the LLM the original description, so it answers about the right entity.",
))

# ---------------------------------------------------------------------------------------------
# Configuration and report
# ---------------------------------------------------------------------------------------------
@dataclass
class AugmentConfig(Config):
    """Settings of one augment run (defaults suit OpenAI's lower usage tiers).

    The endpoint and key are not settings: they come from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``
    (or :func:`run`'s arguments), so they are never printed with the config or saved with a report.
    """

    STAGE: ClassVar[str] = "augment"

    dataset: str = setting("sample", "source dataset (sample, wikimel, richpediamel, wikidiverse, ...)",
                           positional=True)
    out: str | None = setting(None, "output dataset name (default: <dataset>+)")
    model: str = setting(DEFAULT_MODEL, f"model id at the endpoint ('{SAMPLE_ORACLE}' replays the sample's "
                                        "synthetic answers)")
    template: str = setting("who-is", "prompt template name[@version]: who-is, who-is-kb or one you registered")
    concurrency: int = setting(8, "requests in flight (1..1024)", min=1)
    replay: bool = setting(False, "use stored answers only; never call the LLM")
    dry_run: bool = setting(False, "count stored answers and estimate tokens and cost; call nothing")
    batch: bool = setting(False, "use the OpenAI Batch API (half price, results within 24 h) instead of live "
                                 "requests")
    batch_wait: bool = setting(True, "with batch: wait for the results (--no-wait: submit and return; rerun the "
                                     "same command to collect them)", cli="--wait")
    batch_poll_s: float = setting(30.0, "with batch: seconds between polls", above=0, cli="--poll")
    batch_max_requests: int = setting(50_000, "with batch: requests per batch (OpenAI's limit)", min=1, cli=False)
    answers: str | None = setting(None, "JSON file of answers to import first ({qid: text} or "
                                        "{model, template, answers})")
    allow_partial: bool = setting(False, "write the dataset even if some entities failed (they keep the "
                                         "original)")
    force: bool = setting(False, "replace out even if it holds a dataset this run did not build (replaced whole)")
    max_retries: int = setting(5, "retries of one request by the openai client: 429 (after Retry-After), "
                                  "5xx, timeouts, dropped connections", min=0)
    max_attempts: int = setting(3, "requests per entity while its answer comes back malformed or empty", min=1)
    timeout_s: float = setting(60.0, "seconds per request", above=0, cli="--timeout")
    requests_per_s: float | None = setting(None, "client-side cap on request starts per second, if you know "
                                                 "your rate limit", above=0)
    adaptive_rate: bool = setting(True, "learn a request-rate cap from 429s (Retry-After is honoured either way)")
    report: str | None = setting(None, "also write the report JSON to this file")
    progress: bool = setting(True, "show a progress bar")

    def check(self) -> None:
        """The template exists (recorded as ``name@version``); source and output are distinct datasets."""
        if not self.model.strip():
            raise ConfigError(f"{option('model', '--model')} must be a non-empty string")
        self.template = get_template(self.template).id
        if self.concurrency > 1024:
            raise ConfigError(f"{option('concurrency', '--concurrency')} must be in 1..1024, got {self.concurrency}")
        self.dataset = datasets.canonical_name(self.dataset)
        if datasets.is_augmented(self.dataset):
            raise ConfigError(f"{self.dataset!r} is already an augmented dataset; augment its source "
                              f"{datasets.base_name(self.dataset)!r}")
        if self.model == SAMPLE_ORACLE and datasets.base_name(self.dataset) != "sample":
            real = option("model='gpt-4o-mini'", "--model gpt-4o-mini")
            raise ConfigError(f"model {SAMPLE_ORACLE!r} only has answers for the bundled sample, not "
                              f"{self.dataset!r}: pass a real model ({real}) and set OPENAI_API_KEY")
        if self.out is not None:
            given = self.out
            self.out = datasets.canonical_name(self.out)
            flag = option("out", "--out")
            if self.out == self.dataset:
                raise ConfigError(f"{flag} must differ from the source dataset")
            own = f"{self.dataset}+"
            if self.out == RAW_FOLDER:
                raise ConfigError(f"{flag} {given!r} is the folder where released datasets are placed "
                                  f"({RAW_FOLDER}/); choose another output name, e.g. {own!r} (the default)")
            if self.out in datasets.KNOWN_DATASETS and self.out != own:
                what = ("the LLM-augmented dataset of " + repr(datasets.base_name(self.out))
                        if datasets.is_augmented(self.out) else "an original dataset")
                raise ConfigError(f"{flag} {given!r} names {self.out!r}, {what}, not an augmentation of "
                                  f"{self.dataset!r}; omit {flag} (default {own!r}) or choose a name of your "
                                  f"own, e.g. '{self.dataset}-mine+'")

    @property
    def mode(self) -> str:
        """``dry_run``, ``replay``, ``batch`` or ``live`` (in that order of precedence)."""
        return "dry_run" if self.dry_run else "replay" if self.replay else "batch" if self.batch else "live"


@dataclass
class AugmentReport(Result):
    """What one augment run did: counts, failures by reason, tokens, cost, where it wrote."""

    dataset: str
    out: str
    model: str
    template: str
    mode: str                          # "live", "batch", "replay" or "dry_run"
    entities: int = 0
    cached: int = 0                    # answers already stored when the run started
    imported: int = 0                  # answers taken from an answers file this run
    requested: int = 0                 # entities that needed a request
    done: int = 0                      # new answers stored this run
    failed: int = 0
    failed_by_reason: dict = field(default_factory=dict)
    failed_examples: list = field(default_factory=list)   # [{"qid", "name", "reason", "detail"}]
    not_attempted: int = 0             # left when a fatal error (bad key, unknown model, spent quota) stopped the run
    aborted: str | None = None
    requests: int = 0                  # HTTP requests sent, retries included
    retries: int = 0
    rate_limited: int = 0              # 429 answers received
    errors_by_reason: dict = field(default_factory=dict)  # every failed attempt, retried or not
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float | None = None
    estimate: dict = field(default_factory=dict)   # dry run: tokens and cost of what would be sent
    batches: list = field(default_factory=list)    # Batch API mode: [{"id", "requests", "status", "resumed"}]
    batches_pending: int = 0           # Batch API mode: submitted, not finished yet (rerun to collect)
    batches_lost: list = field(default_factory=list)     # [{"id", "entities"}]: batches the endpoint answers 404 for
    batches_waiting: list = field(default_factory=list)  # live/dry run: [{"id", "entities"}] left to a pending batch
    endpoint: str | None = None        # base URL (never the key)
    elapsed_s: float = 0.0
    answers_per_s: float | None = None   # answers stored per second of the live phase
    written: bool = False
    out_path: str | None = None
    synthetic_answers: bool = False
    note: str = ""

    @property
    def exit_code(self) -> int:
        """1 when the dataset was not written (and nothing is pending and it was no dry run)."""
        return 0 if (self.written or self.mode == "dry_run" or self.batches_pending or self.batches_waiting) else 1

    def waiting_lines(self) -> list[str]:
        """One line per pending batch whose entities this run left to it."""
        return [f"{b['entities']} entities wait in batch {b['id']}: rerun with {option('batch=True', '--batch')} "
                "to collect them" for b in self.batches_waiting]

    def summary(self) -> str:
        """A few readable lines."""
        lines = [f"augment {self.dataset} -> {self.out} | model {self.model} | template {self.template} "
                 f"| mode {self.mode}"]
        if self.mode == "dry_run":
            e = self.estimate
            covered = e.get("answers_file_covers", 0)
            lines.append(f"entities {self.entities}: {self.cached} stored"
                         + (f", {covered} in the answers file" if covered else "")
                         + f", {e.get('requests', self.requested)} would be requested")
            lines.append(f"estimate: ~{e.get('prompt_tokens', 0):,} prompt + ~{e.get('completion_tokens', 0):,} "
                         f"completion tokens ({e.get('basis', '')}); cost "
                         f"{_money(e.get('cost_usd'))} (Batch API: {_money(e.get('cost_usd_batch'))})")
        else:
            lines.append(f"entities {self.entities}: cached {self.cached}, imported {self.imported}, "
                         f"done {self.done}, failed {self.failed}"
                         + (f" {self.failed_by_reason}" if self.failed else "")
                         + (f", not attempted {self.not_attempted}" if self.not_attempted else ""))
            for ex in self.failed_examples[:5]:
                lines.append(f"  failed: {ex['qid']} ({ex['name']!r}): {ex['reason']}: {ex['detail']}")
            if self.mode == "batch":
                lines.append(f"batches {len(self.batches)} ({sum(b.get('resumed', False) for b in self.batches)} "
                             f"resumed), pending {self.batches_pending}; tokens {self.prompt_tokens:,} prompt + "
                             f"{self.completion_tokens:,} completion; cost {_money(self.cost_usd)} (batch price)")
                if self.batches_pending:
                    lines.append("batches still running: rerun the same command to collect them "
                                 "(nothing is submitted twice)")
            elif self.mode == "live":
                rate = f", {self.answers_per_s:.1f} answers/s" if self.answers_per_s else ""
                lines.append(f"requests {self.requests} (retries {self.retries}, 429s {self.rate_limited})"
                             f" in {self.elapsed_s:.1f} s{rate}; tokens {self.prompt_tokens:,} prompt + "
                             f"{self.completion_tokens:,} completion; cost {_money(self.cost_usd)}")
            else:
                lines.append("requests 0 (replay)")
        for b in self.batches_lost:
            then = ("submitted again in a new batch" if b.get("resubmitted") else
                    "recorded as failed (batch_lost); rerun to ask for them again")
            lines.append(f"batch {b['id']} is unknown to the endpoint (HTTP 404): marked lost, not resumed again; "
                         f"its {b['entities']} entities were {then}")
        lines += self.waiting_lines()
        if self.aborted:
            lines.append(f"ABORTED: {self.aborted}")
        if self.written:
            lines.append(f"wrote {self.out_path}")
        elif self.mode != "dry_run" and not self.batches_pending and not self.batches_waiting:
            lines.append(f"not written: {self.failed + self.not_attempted} entities lack an answer; rerun to "
                         f"retry them (stored answers are kept), or pass {option('allow_partial=True', '--allow-partial')}")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def _money(x: float | None) -> str:
    return "unknown (no price for this model)" if x is None else f"${x:,.4f}"


# ---------------------------------------------------------------------------------------------
# Entities -> requests
# ---------------------------------------------------------------------------------------------
@dataclass
class _Job:
    qid: str
    name: str
    key: str
    messages: list[dict]


def _jobs(entities: pd.DataFrame, model: str, template: Template) -> list[_Job]:
    jobs = []
    for qid, name, desc in zip(entities["qid"], entities["name"], entities["description"]):
        desc = desc if isinstance(desc, str) else None
        messages = template.render(str(qid), str(name), desc)
        jobs.append(_Job(qid=str(qid), name=str(name), messages=messages,
                         key=entity_key(model, template, str(qid), str(name), messages)))
    return jobs


def entity_key(model: str, template: Template, qid: str, name: str, messages: list[dict]) -> str:
    """Store key of one entity's answer: model, template version, entity and the rendered prompt."""
    return make_key(KIND, model, template.id, {"qid": qid, "name": name, "prompt": messages})


def _load_answers_file(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))  # a byte order mark is fine
    except FileNotFoundError:
        raise DataError("answers file not found", file=path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=path) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg}, line {exc.lineno})", file=path) from None
    if not isinstance(data, dict):
        raise DataError("expected a JSON object", file=path)
    if "answers" not in data:  # a plain {qid: text} mapping
        data = {"answers": data}
    if not isinstance(data["answers"], dict):
        raise DataError("expected an object {qid: text}", file=path, field="answers")
    return data


def import_answers(path: str | Path, dataset: str | datasets.Dataset, *, model: str | None = None,
                   template: str | Template | None = None, store: Store | None = None,
                   data_dir: str | Path | None = None) -> int:
    """Store answers from a JSON file ``{"model", "template", "answers": {qid: text}}``; returns the new count.

    The file's model and template are used unless given (a template without ``@version`` means its
    latest version). Answers are keyed exactly as a live run would key them, so a later run finds
    them. Files from the bundled sample are marked synthetic (``"synthetic": true`` or model
    ``sample-oracle``).
    """
    path = Path(path)
    ds = dataset if isinstance(dataset, datasets.Dataset) else datasets.load(dataset, data_dir)
    data = _load_answers_file(path)
    model = model or data.get("model")
    if not model:
        raise DataError("no model named: pass model= or add \"model\" to the file", file=path, field="model")
    tmpl = get_template(template or data.get("template") or "who-is")
    synthetic = bool(data.get("synthetic", model == SAMPLE_ORACLE))
    store = store or Store(default_store_path("llm"))
    answers = data["answers"]
    rows = []
    jobs = {j.qid: j for j in _jobs(ds.entities, model, tmpl)}
    present = store.get_many([jobs[q].key for q in answers if q in jobs])
    for qid, text in answers.items():
        job = jobs.get(str(qid))
        if job is None or job.key in present:
            continue  # not an entity of this dataset, or already stored
        if not isinstance(text, str) or not text.strip():
            raise DataError("empty answer", file=path, record=qid, field="answers")
        value = {"description": text.strip(), "qid": job.qid, "name": job.name, "model": model,
                 "template": tmpl.id, "source": f"imported:{path.name}", "synthetic": synthetic}
        if data.get("note"):
            value["note"] = str(data["note"])
        rows.append((job.key, value, job.qid))
    return store.put_many(rows, kind=KIND, model=model, version=tmpl.id)


def _bundled_answers(ds: datasets.Dataset) -> Path | None:
    """The answers file shipped beside a dataset's source (the bundled sample has one)."""
    candidates = []
    if ds.name == "sample":
        candidates.append(paths.sample_source_dir())
    for key in ("source_path", "source_resolved", "source"):
        value = ds.meta.get(key)
        if isinstance(value, str) and value:
            candidates.append(Path(value))
    for folder in candidates:
        p = folder / ANSWERS_FILE
        if p.is_file():
            return p
    return None

# ---------------------------------------------------------------------------------------------
# The live run
# ---------------------------------------------------------------------------------------------
def _answer(job: _Job, answer: Completion, cfg: AugmentConfig, **extra: Any) -> tuple[str, dict, str]:
    """The store row of one answer."""
    return (job.key, {"description": answer.text, "qid": job.qid, "name": job.name, "model": cfg.model,
                      "template": cfg.template, "response_model": answer.model,
                      "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
                      "completion_tokens": answer.completion_tokens, **extra}, job.qid)


def _failed(job: _Job, err: LLMError, cfg: AugmentConfig, store: Store, report: AugmentReport) -> None:
    """Record a failure in the store (a rerun asks again) and in the report."""
    store.put_failure(job.key, kind=KIND, model=cfg.model, version=cfg.template, item=job.qid,
                      reason=err.reason, detail=err.detail)
    report.failed += 1
    report.failed_by_reason[err.reason] = report.failed_by_reason.get(err.reason, 0) + 1
    if len(report.failed_examples) < 20:
        report.failed_examples.append({"qid": job.qid, "name": job.name, "reason": err.reason,
                                       "detail": err.detail})


def _run_live(todo: list[_Job], client: ChatClient, cfg: AugmentConfig, tmpl: Template, store: Store,
              report: AugmentReport, pbar: Any) -> None:
    """Ask for every job from ``cfg.concurrency`` worker threads; this thread stores answers as they arrive.

    The store has one writer (this thread): whatever arrived while it committed goes into the next
    transaction together, so a slow fsync never holds back a request.
    """
    jobs = iter(todo)
    take = threading.Lock()
    arrivals: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def work() -> None:
        try:
            while not stop.is_set():
                with take:
                    job = next(jobs, None)
                if job is None:
                    return
                try:
                    outcome: Any = client.complete(cfg.model, job.messages, max_tokens=tmpl.max_tokens,
                                                   temperature=tmpl.temperature)
                except LLMError as err:
                    outcome = err
                    if err.fatal:  # every further request would fail alike
                        stop.set()
                except Exception as exc:  # a bug: raised by the storing thread
                    outcome = exc
                arrivals.put((job, outcome))
        finally:
            arrivals.put(None)

    workers = [threading.Thread(target=work, name=f"dimkit-augment-{i}", daemon=True)
               for i in range(min(cfg.concurrency, len(todo)))]
    t0 = time.perf_counter()
    for w in workers:
        w.start()
    running = len(workers)
    try:
        while running:
            batch = [arrivals.get()]
            while True:
                try:
                    batch.append(arrivals.get_nowait())
                except queue.Empty:
                    break
            rows, answers, failures = [], [], []
            for item in batch:
                if item is None:
                    running -= 1
                    continue
                job, outcome = item
                if isinstance(outcome, Completion):
                    rows.append(_answer(job, outcome, cfg))
                    answers.append(outcome)
                elif isinstance(outcome, LLMError):
                    failures.append((job, outcome))
                    if outcome.fatal and report.aborted is None:
                        report.aborted = f"{outcome.reason}: {outcome.detail}"
                else:
                    raise outcome
            try:
                store.put_many(rows, kind=KIND, model=cfg.model, version=cfg.template)
                for job, err in failures:
                    _failed(job, err, cfg, store, report)
            except Exception as exc:  # e.g. disk full: stop, do not lose more
                raise DimkitError(f"writing to the store {store.path} failed: {exc!r}; answers committed "
                                  "before it are kept") from exc
            report.done += len(rows)
            report.prompt_tokens += sum(a.prompt_tokens or 0 for a in answers)
            report.completion_tokens += sum(a.completion_tokens or 0 for a in answers)
            pbar.update(len(rows) + len(failures))
            pbar.set_postfix(done=report.done, cached=report.cached + report.imported, failed=report.failed,
                             refresh=False)
    finally:
        stop.set()
        elapsed = time.perf_counter() - t0
        report.answers_per_s = round(report.done / elapsed, 2) if elapsed > 0 and report.done else None
        with take:
            report.not_attempted = sum(1 for _ in jobs)
        counts = client.counts()
        report.requests, report.errors_by_reason = counts["requests"], counts["errors"]
        report.retries = counts["requests"] - counts["calls"]
        report.rate_limited = counts["errors"].get("rate_limited", 0)


# ---------------------------------------------------------------------------------------------
# Batch API mode
# ---------------------------------------------------------------------------------------------
def _batch_reason(status_code: Any, error: Any, body: Any = None) -> str:
    if isinstance(status_code, int) and status_code != 200:
        err = body.get("error") if isinstance(body, dict) else None
        if status_code == 429 and isinstance(err, dict) and QUOTA_CODE in (err.get("code"), err.get("type")):
            return "quota"  # the credit ran out while the batch ran: a rerun asks again once it is topped up
        return status_reason(status_code)
    code = str(error.get("code", "")) if isinstance(error, dict) else ""
    for reason in ("rate_limit", "server_error"):
        if reason in code:
            return "rate_limited" if reason == "rate_limit" else reason
    return "batch_error" if error else "malformed"


def _pending_batches(store: Store, cfg: AugmentConfig, keys: Iterable[str]) -> list[tuple[str, dict]]:
    """The batches of ``cfg``'s model and template recorded as submitted and not yet collected that cover
    any of ``keys``: ``[(store key, value)]``."""
    keys = set(keys)
    return [(rec["key"], rec["value"]) for rec in store.items(BATCH_KIND)
            if rec["model"] == cfg.model and rec["version"] == cfg.template
            and rec["value"].get("state") == "submitted" and keys & set(rec["value"]["keys"])]


def _run_batch(todo: list[_Job], client: ChatClient, cfg: AugmentConfig, tmpl: Template, store: Store,
               report: AugmentReport, pbar: Any) -> None:
    """Submit what is missing as Batch API jobs (half price), poll them, ingest answers into the store.

    Each submitted batch is recorded in the store (kind ``llm_batch``) the moment it is created, so
    an interrupted run resumes polling it on the next run instead of paying for it twice.
    """
    by_key = {j.key: j for j in todo}
    pending = []
    for key, v in _pending_batches(store, cfg, by_key):
        entry = {"id": v["batch_id"], "requests": len(v["keys"]), "status": "resumed", "resumed": True}
        report.batches.append(entry)
        try:
            client.status(v["batch_id"])
        except BatchNotFound:  # the endpoint forgot it (or is another one): its entities are asked again
            _mark_lost(store, key, v, cfg, entry, report, entities=len(by_key.keys() & set(v["keys"])),
                       resubmitted=True)
            continue
        pending.append((key, v))
    covered = {k for _, v in pending for k in v["keys"]}
    fresh = [j for j in todo if j.key not in covered]
    for i in range(0, len(fresh), cfg.batch_max_requests):
        chunk = fresh[i:i + cfg.batch_max_requests]
        lines = [{"custom_id": j.key, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": cfg.model, "messages": j.messages, "max_tokens": tmpl.max_tokens,
                           "temperature": tmpl.temperature}} for j in chunk]
        info = client.submit(lines, metadata={"dimkit": f"{cfg.model} {cfg.template}"})
        value = {**info, "keys": [j.key for j in chunk], "qids": [j.qid for j in chunk], "state": "submitted",
                 "submitted": time.time()}
        key = make_key(BATCH_KIND, cfg.model, cfg.template, {"batch_id": info["batch_id"]})
        store.put(key, value, kind=BATCH_KIND, model=cfg.model, version=cfg.template, item=info["batch_id"])
        pending.append((key, value))
        report.requests += len(chunk)  # chat requests submitted (in one upload)
        report.batches.append({"id": info["batch_id"], "requests": len(chunk), "status": "submitted",
                               "resumed": False})
    while pending and cfg.batch_wait:
        for key, value in list(pending):
            try:
                st = client.status(value["batch_id"])
            except BatchNotFound as exc:  # forgotten while we waited: a rerun asks for its entities again
                entry = next(b for b in report.batches if b["id"] == value["batch_id"])
                _mark_lost(store, key, value, cfg, entry, report, entities=len(by_key.keys() & set(value["keys"])),
                           resubmitted=False)
                pending = [p for p in pending if p[0] != key]
                for k in value["keys"]:
                    if k in by_key:
                        _failed(by_key[k], LLMError("batch_lost", str(exc)), cfg, store, report)
                        pbar.update(1)
                continue
            if st["status"] not in BATCH_FINAL:
                continue
            _ingest_batch(client, value, st, by_key, cfg, store, report, pbar)
            value = {**value, "state": "ingested", "status": st["status"]}
            store.put(key, value, kind=BATCH_KIND, model=cfg.model, version=cfg.template, item=value["batch_id"])
            pending = [p for p in pending if p[0] != key]
            for b in report.batches:
                if b["id"] == value["batch_id"]:
                    b["status"] = st["status"]
        if pending:
            time.sleep(cfg.batch_poll_s)
    report.batches_pending = len(pending)


def _mark_lost(store: Store, key: str, value: dict, cfg: AugmentConfig, entry: dict,
               report: AugmentReport, *, entities: int, resubmitted: bool) -> None:
    """Record a batch the endpoint answers 404 for as lost, so no run waits for it again."""
    store.put(key, {**value, "state": "lost", "status": "lost", "lost": time.time()}, kind=BATCH_KIND,
              model=cfg.model, version=cfg.template, item=value["batch_id"])
    entry["status"] = "lost"
    report.batches_lost.append({"id": value["batch_id"], "entities": entities, "resubmitted": resubmitted})


def _ingest_batch(client: ChatClient, value: dict, st: dict, by_key: dict[str, _Job], cfg: AugmentConfig,
                  store: Store, report: AugmentReport, pbar: Any) -> None:
    """Store the answers of one finished batch; every request without a usable answer is a failure."""
    rows, failures, seen = [], [], set()
    for fid in (st.get("output_file_id"), st.get("error_file_id")):
        if not fid:
            continue
        for line in client.download(fid).splitlines():
            try:
                item = json.loads(line)
                key = item["custom_id"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line we cannot attribute; its request is reported missing below
            job = by_key.get(key)
            if job is None or key in seen:
                continue
            seen.add(key)
            resp = item.get("response") or {}
            if item.get("error") or resp.get("status_code") != 200:
                failures.append((job, LLMError(_batch_reason(resp.get("status_code"), item.get("error"), resp.get("body")),
                                               str(item.get("error") or resp.get("body"))[:300])))
                continue
            try:
                answer = parse_completion(json.dumps(resp.get("body")), client.endpoint.api_key)
            except LLMError as err:
                failures.append((job, err))
                continue
            rows.append(_answer(job, answer, cfg, batch_id=value["batch_id"]))
            report.prompt_tokens += answer.prompt_tokens or 0
            report.completion_tokens += answer.completion_tokens or 0
    for key in value["keys"]:
        if key not in seen and key in by_key:
            failures.append((by_key[key], LLMError(f"batch_{st['status']}", "no result line for this request")))
    store.put_many(rows, kind=KIND, model=cfg.model, version=cfg.template)
    for job, err in failures:
        _failed(job, err, cfg, store, report)
    report.done += len(rows)
    pbar.update(len(rows) + len(failures))


# ---------------------------------------------------------------------------------------------
# Writing the '+' dataset
# ---------------------------------------------------------------------------------------------
def _image_paths(ds: datasets.Dataset) -> Iterable[str]:
    lists = [[v] for v in ds.mentions["image"]]
    for frame in (ds.mentions, ds.entities):
        if "images" in frame.columns:
            lists += [lst for lst in frame["images"] if lst is not None and not isinstance(lst, float)]
    return (v for lst in lists for v in lst if isinstance(v, str) and v)


def link_images(source: datasets.Dataset, out_root: Path) -> list[str]:
    """Link the source's image folders into the new '+' folder ``out_root``; returns the linked names.

    Image paths stay exactly as in the source (relative to the dataset folder, never with '..',
    which :func:`dimkit.datasets.check_relative_path` forbids). Each first path component (e.g.
    ``images``) becomes a relative symlink ``out/images -> ../<source>/images``: no image is copied,
    and moving the whole data folder keeps the links valid.
    """
    tops = sorted({Path(p.replace("\\", "/")).parts[0] for p in _image_paths(source)})
    reserved = {"mentions.parquet", "entities.parquet", "candidates.parquet", "meta.json"}
    linked = []
    for top in tops:
        if top in reserved or top in (".", ".."):
            raise DataError(f"image folder name {top!r} clashes with a dataset file",
                            file=source.root / "mentions.parquet", field="image")
        target = source.root / top
        if not target.exists():
            continue  # nothing to link: the images are missing in the source too (images.py reports it)
        try:
            os.symlink(os.path.relpath(target, out_root), out_root / top, target_is_directory=target.is_dir())
        except OSError as exc:  # e.g. Windows without the symlink privilege
            raise DimkitError(f"cannot link the source images into {out_root} ({exc}); enable symlinks "
                              "(Windows: Developer Mode) and rerun") from None
        linked.append(top)
    return linked


def _write_plus(ds: datasets.Dataset, out: str, values: dict[str, dict], jobs: list[_Job],
                cfg: AugmentConfig, template: Template, report: AugmentReport,
                data_dir: str | Path | None) -> Path:
    ents = ds.entities.copy()
    source_tag = f"llm:{cfg.model}:{template.id}"
    originals = ents["description"].tolist()
    orig_sources = (ents["description_source"].tolist() if "description_source" in ents.columns
                    else ["original"] * len(ents))
    desc, src = [], []
    for job, orig, osrc in zip(jobs, originals, orig_sources):
        v = values.get(job.key)
        if v is not None:
            desc.append(v["description"])
            src.append(source_tag)
        else:  # only with allow_partial: keep the original and say so
            desc.append(orig if isinstance(orig, str) else None)
            src.append(f"original ({osrc}); no LLM answer" if isinstance(osrc, str)
                       else "original; no LLM answer")
    ents["description_original"] = [o if isinstance(o, str) else None for o in originals]
    ents["description"] = desc
    ents["description_source"] = src
    n_llm = sum(1 for s in src if s == source_tag)
    meta = {k: v for k, v in ds.meta.items() if k not in ("counts", "image_links")}
    meta.update({
        "name": out,
        "augmented_from": ds.name,
        "description_source": source_tag,
        "synthetic_answers": report.synthetic_answers,
        "augment": {
            "model": cfg.model, "template": template.id,
            "template_text": {"system": template.system, "user": template.user},
            "description_source": source_tag, "llm_descriptions": n_llm,
            "original_descriptions_kept": len(ents) - n_llm,
            "endpoint": report.endpoint, "mode": report.mode,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "build_key": _build_key(ds, values, jobs, cfg, template),
        },
    })
    if report.synthetic_answers:
        meta["notes"] = list(meta.get("notes") or []) + [
            "descriptions are synthetic oracle answers shipped with the sample, not an LLM's"]
        meta["note"] = ("descriptions are SYNTHETIC oracle answers shipped with the sample, not an LLM's; "
                        "nothing computed from them is comparable to the paper")
    out_root = datasets.dataset_dir(out, data_dir)
    if _existing_build(out_root) == meta["augment"]["build_key"]:
        return out_root  # the same source, answers and settings: already written, nothing to redo
    # Built whole beside the old folder, then swapped in: never merged into what was there.
    with atomic.building(out_root) as stage:
        meta["image_links"] = link_images(ds, stage)
        datasets.write_prepared(stage, ds.mentions, ents, meta, candidates=ds.candidates, source=out_root)
    return out_root


def _build_key(ds: datasets.Dataset, values: dict[str, dict], jobs: list[_Job], cfg: AugmentConfig,
               template: Template) -> str:
    """What a '+' dataset is made of: the source's files and every answer used."""
    files = [imagefile_sha256(ds.root / f) if (ds.root / f).exists() else None
             for f in ("mentions.parquet", "entities.parquet", "candidates.parquet")]
    answers = [values[j.key]["description"] if j.key in values else None for j in jobs]
    return make_key("plus_dataset", cfg.model, template.id, {"source": ds.name, "files": files,
                                                             "answers": content_hash(answers)})


def _existing_build(out_root: Path) -> str | None:
    try:
        meta = json.loads((out_root / "meta.json").read_text())
        return (meta.get("augment") or {}).get("build_key")
    except (OSError, ValueError, AttributeError):
        return None


def check_out(out_root: Path, ds: datasets.Dataset, cfg: AugmentConfig, template: Template) -> None:
    """Refuse an ``out`` folder that holds a dataset this augment run did not build (unless ``cfg.force``).

    "This run's" means built by ``dimkit augment`` from the same source with the same model and
    template; anything else there (another prepared dataset, another augmentation, stray files)
    would be lost.
    """
    if cfg.force or not (out_root.exists() or out_root.is_symlink()):
        return
    if out_root.is_dir() and not any(out_root.iterdir()):
        return
    what = None
    try:
        meta = json.loads((out_root / "meta.json").read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict):
        what = "files that are not a complete dataset (no readable meta.json)"
    else:
        aug = meta.get("augment") or {}
        if (meta.get("augmented_from") == ds.name and aug.get("model") == cfg.model
                and aug.get("template") == template.id):
            return
        if meta.get("augmented_from"):
            what = (f"the dataset {meta.get('name')!r} augmented from {meta.get('augmented_from')!r} with model "
                    f"{aug.get('model')!r}, template {aug.get('template')!r}")
        else:
            c = meta.get("counts") or {}
            src = f", from {meta['source']}" if meta.get("source") else ""
            what = f"the prepared dataset {meta.get('name') or out_root.name!r} ({c.get('mentions', '?')} mentions{src})"
    raise ConfigError(f"{out_root} holds {what}; this augment run ({ds.name} -> model {cfg.model}, template "
                      f"{template.id}) would replace it. Choose another output name, or pass "
                      f"{option('force=True', '--force')} to replace it.")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def run(cfg: AugmentConfig, *, store: Store | str | Path | None = None, base_url: str | None = None,
        api_key: str | None = None, prices: Mapping[str, tuple[float, float]] | None = None,
        data_dir: str | Path | None = None) -> AugmentReport:
    """Write ``cfg.out`` (default ``<dataset>+``) with an LLM description of every entity of ``cfg.dataset``.

    ``store``: where answers are kept (default ``$DIMKIT_CACHE/llm.sqlite``); ``base_url`` and
    ``api_key``: the endpoint (default ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``); ``prices``: USD per
    1M tokens ``{model: (input, output)}`` beside :data:`dimkit.llm.PRICES_USD_PER_1M`. The report is
    also written to ``runs/augment/<out>.json``.
    """
    cfg = copy.deepcopy(cfg).validate()
    own_store = not isinstance(store, Store)
    if own_store:
        store = Store(store if store is not None else default_store_path("llm"))
    try:
        report = _run(cfg, store, base_url, api_key, prices, data_dir)
    finally:
        if own_store:
            store.close()
    if cfg.report:
        report.save(cfg.report)
    return report


def augment(name: str, *, store: Store | str | Path | None = None, base_url: str | None = None,
            api_key: str | None = None, prices: Mapping[str, tuple[float, float]] | None = None,
            data_dir: str | Path | None = None, **settings: Any) -> AugmentReport:
    """``run(AugmentConfig.for_dataset(name, **settings), ...)``: settings are :class:`AugmentConfig`'s."""
    return run(AugmentConfig.for_dataset(name, **settings), store=store, base_url=base_url, api_key=api_key,
               prices=prices, data_dir=data_dir)


def _run(cfg: AugmentConfig, store: Store, base_url: str | None, api_key: str | None,
         prices: Mapping[str, tuple[float, float]] | None, data_dir: str | Path | None) -> AugmentReport:
    tmpl = get_template(cfg.template)
    ds = datasets.load(cfg.dataset, data_dir)
    out = cfg.out or f"{ds.name}+"
    report = AugmentReport(dataset=ds.name, out=out, model=cfg.model, template=tmpl.id, mode=cfg.mode)
    t0 = time.perf_counter()
    jobs = _jobs(ds.entities, cfg.model, tmpl)
    report.entities = len(jobs)
    report.cached = len(store.get_many(j.key for j in jobs))

    answers_path = Path(cfg.answers) if cfg.answers is not None else None
    if answers_path is not None:
        file_model = _load_answers_file(answers_path).get("model")
        if file_model and file_model != cfg.model:
            raise ConfigError(f"{answers_path} holds answers of model {file_model!r}, but model is {cfg.model!r}")
    else:
        bundled = _bundled_answers(ds)
        if bundled is not None and _load_answers_file(bundled).get("model") == cfg.model:
            answers_path = bundled
    if answers_path is not None and not cfg.dry_run:
        tspec = _load_answers_file(answers_path).get("template")
        if tspec and get_template(tspec).name != tmpl.name:
            raise ConfigError(f"{answers_path} holds answers to template {tspec!r}, not {tmpl.id!r}")
        report.imported = import_answers(answers_path, ds, model=cfg.model, template=tmpl, store=store)

    values = store.get_many(j.key for j in jobs)
    todo = [j for j in jobs if j.key not in values]
    waiting: set[str] = set()
    if not cfg.batch or cfg.dry_run:  # what a pending batch will answer is not paid for twice
        todo_keys = {j.key for j in todo}
        for _, v in _pending_batches(store, cfg, todo_keys):
            mine = todo_keys.intersection(v["keys"]) - waiting
            waiting |= mine
            if mine:
                report.batches_waiting.append({"id": v["batch_id"], "entities": len(mine)})
        if not cfg.replay or cfg.dry_run:  # replay asks nothing anyway; its error names them
            todo = [j for j in todo if j.key not in waiting]
    report.requested = len(todo)
    report.synthetic_answers = any(v.get("synthetic") for v in values.values())
    if report.synthetic_answers:
        report.note = ("NOTE: these descriptions are SYNTHETIC oracle answers shipped with the sample "
                       "(model 'sample-oracle'), not an LLM's.")

    if cfg.dry_run:
        _estimate(report, todo, store, cfg, tmpl, prices, answers_path)
        report.elapsed_s = round(time.perf_counter() - t0, 3)
        return report
    if cfg.replay and todo:
        first = todo[0]
        raise DimkitError(
            f"replay: no stored answer for entity {first.qid} ({first.name!r}) of {ds.name!r} "
            f"[model {cfg.model}, template {tmpl.id}]; {len(todo)} of {len(jobs)} entities lack one. "
            f"Run without {option('replay=True', '--replay')} to request them, or import answers with "
            f"{option('answers=FILE', '--answers FILE')}." + "".join(f" {line}." for line in report.waiting_lines()))
    # before any request: a run that could not write its result must not spend money first
    check_out(datasets.dataset_dir(out, data_dir), ds, cfg, tmpl)

    report.cost_usd = 0.0
    if todo:
        endpoint = Endpoint.resolve(base_url, api_key)
        report.endpoint = endpoint.public_url
        with ChatClient(endpoint, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,  # raises if no key
                        max_attempts=cfg.max_attempts, requests_per_s=cfg.requests_per_s,
                        adaptive_rate=cfg.adaptive_rate) as client, \
                tqdm(total=len(jobs) - len(waiting), initial=len(jobs) - len(waiting) - len(todo), unit="entity",
                     desc=f"augment {ds.name}" + (" (batch)" if cfg.batch else ""),
                     # disable only to switch the bar off: disable=False would override TQDM_DISABLE
                     **({} if cfg.progress else {"disable": True})) as pbar:
            client.check()  # one clear error before any work if the endpoint is down or the key is bad
            (_run_batch if cfg.batch else _run_live)(todo, client, cfg, tmpl, store, report, pbar)
        cost = estimate_cost(cfg.model, report.prompt_tokens, report.completion_tokens, prices=prices,
                             batch=cfg.batch)
        report.cost_usd = None if cost is None else round(cost, 6)
        values = store.get_many(j.key for j in jobs)

    if all(j.key in values for j in jobs) or cfg.allow_partial:
        report.out_path = str(_write_plus(ds, out, values, jobs, cfg, tmpl, report, data_dir))
        report.written = True
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    report.save(paths.runs_dir() / "augment" / f"{out}.json")
    return report


def _estimate(report: AugmentReport, todo: list[_Job], store: Store, cfg: AugmentConfig, tmpl: Template,
              prices: Mapping[str, tuple[float, float]] | None, answers_path: Path | None) -> None:
    """Fill ``report.estimate`` for a dry run (nothing is called or written)."""
    prompt = sum(estimate_prompt_tokens(j.messages) for j in todo)
    if answers_path is not None:  # a replayable answers file would cover these
        have = set(_load_answers_file(answers_path)["answers"])
        todo = [j for j in todo if j.qid not in have]
        report.estimate["answers_file_covers"] = report.requested - len(todo)
        prompt = sum(estimate_prompt_tokens(j.messages) for j in todo)
    seen = [r["value"].get("completion_tokens") for r in store.items(KIND)
            if r["model"] == cfg.model and r["version"] == tmpl.id]
    seen = [t for t in seen if isinstance(t, int)]
    if len(seen) >= 5:
        per = sum(seen) / len(seen)
        basis = f"prompt ~4 chars/token; completion = mean of {len(seen)} stored answers"
    else:
        per = float(tmpl.max_tokens)
        basis = f"prompt ~4 chars/token; completion = max_tokens {tmpl.max_tokens} (upper bound)"
    completion = round(per * len(todo))
    cost = estimate_cost(cfg.model, prompt, completion, prices=prices)
    batch = estimate_cost(cfg.model, prompt, completion, prices=prices, batch=True)
    report.estimate.update({
        "requests": len(todo), "prompt_tokens": prompt, "completion_tokens": completion, "basis": basis,
        "cost_usd": None if cost is None else round(cost, 4),
        "cost_usd_batch": None if batch is None else round(batch, 4),
    })


def before_after(name: str, n: int = 5, data_dir: str | Path | None = None) -> pd.DataFrame:
    """A few entities of a '+' dataset with their original and LLM descriptions side by side."""
    ds = datasets.load(name, data_dir)
    if "description_original" not in ds.entities.columns:
        raise DimkitError(f"{ds.name!r} has no description_original column: not built by `dimkit augment`")
    cols = ["qid", "name", "description_original", "description", "description_source"]
    return ds.entities[cols].head(n).reset_index(drop=True)


#: The command line: ``dimkit augment`` takes the flags of :class:`AugmentConfig`, runs :func:`run`, prints its report.
CONFIG = AugmentConfig
