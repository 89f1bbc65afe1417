"""Build the '+' datasets: ask an LLM "Who is ...?" about every entity (notebook ``01_augment``).

DIM's first contribution (the paper's Wiki+, Rich+, Diverse+) replaces each KB entity's static description
with a fresher, richer one written by ChatGPT, producing Wiki+, Rich+ and Diverse+. The released
code ships only the finished files; this module makes the step itself reliable and cheap to rerun:

- the prompt is a named, versioned :class:`Template` (``who-is@1``, modelled on the paper's
  "Who is ...?" question); :func:`register_template` adds more;
- every answer is stored the moment it arrives in :class:`dimkit.store.Store` under
  (model, template version, entity + rendered prompt), so a rerun sends no request for a stored
  entity and ``kill -9`` loses at most the requests in flight;
- requests go to any OpenAI-compatible endpoint (:mod:`dimkit.llm`) with bounded concurrency;
  429 (honouring ``Retry-After``, which also pauses the other workers, and teaching the client a
  request-rate cap), 5xx, timeouts and dropped connections are retried with exponential backoff
  and jitter up to a limit, then the entity is recorded as failed and the run goes on; a malformed
  or empty completion is a failure, never a description, and is retried on the next run;
- ``batch=True`` sends what is missing through the OpenAI Batch API instead (half the price);
  submitted batches are recorded in the store, so an interrupted run resumes them;
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

import argparse
import asyncio
import collections
import concurrent.futures
import datetime as _dt
import heapq
import json
import os
import queue
import random
import re
import shutil
import string
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd
from tqdm.auto import tqdm

from . import atomic, datasets, paths
from .errors import ConfigError, DataError, DimkitError, option
from .images import sha256_file as imagefile_sha256
from .llm import (BATCH_FINAL, BatchClient, ChatClient, Completion, Endpoint, LLMError, estimate_cost,
                  estimate_prompt_tokens, parse_completion, price_of)
from .store import Store, content_hash, default_store_path, make_key

#: Store kind of LLM-written entity descriptions.
KIND = "llm_description"
#: Store kind of submitted Batch API jobs, so a rerun resumes polling instead of submitting again.
BATCH_KIND = "llm_batch"
#: A cheap, capable default for real runs; any model the endpoint serves works.
DEFAULT_MODEL = "gpt-4o-mini"
#: The model id under which the sample's synthetic answers are stored.
SAMPLE_ORACLE = "sample-oracle"
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


# The paper's question is "Who is ...?" about each entity (its exact wording is not published; spec
# 2.3). Asking for distinguishing facts is what makes the answers useful for disambiguation.
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
class AugmentConfig:
    """Settings of one augment run (defaults suit OpenAI's lower usage tiers)."""

    model: str = DEFAULT_MODEL
    template: str = "who-is"
    concurrency: int = 8              # requests in flight at once
    max_attempts: int = 5             # per entity, for 5xx / timeouts / dropped connections
    timeout_s: float = 60.0           # per request
    backoff_base_s: float = 1.0       # first retry waits about this long, doubling each time
    backoff_max_s: float = 60.0
    rate_limit_wait_s: float = 600.0  # most time one entity may spend waiting on 429 Retry-After
    requests_per_s: float | None = None  # optional client-side cap, if you know your rate limit
    adaptive_rate: bool = True        # learn a cap from 429s (AIMD) instead of bouncing off the limit
    seed: int | None = None           # of the retry jitter (tests)
    batch_poll_s: float = 30.0        # Batch API mode: seconds between status polls
    batch_max_requests: int = 50_000  # Batch API mode: requests per batch (OpenAI's limit)

    def validate(self) -> "AugmentConfig":
        """Raise ConfigError on a value out of range."""
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model must be a non-empty string")
        get_template(self.template)
        if not isinstance(self.concurrency, int) or not 1 <= self.concurrency <= 1024:
            raise ConfigError(f"concurrency must be an int in 1..1024, got {self.concurrency!r}")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigError(f"max_attempts must be a positive int, got {self.max_attempts!r}")
        if not isinstance(self.batch_max_requests, int) or self.batch_max_requests < 1:
            raise ConfigError("batch_max_requests must be a positive int")
        for name in ("timeout_s", "backoff_base_s", "backoff_max_s", "rate_limit_wait_s", "batch_poll_s"):
            if not float(getattr(self, name)) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.requests_per_s is not None and not self.requests_per_s > 0:
            raise ConfigError("requests_per_s must be > 0 (or None for no client-side cap)")
        return self


@dataclass
class AugmentReport:
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
    not_attempted: int = 0             # left when a fatal error (bad key, unknown model) stopped the run
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
    endpoint: str | None = None        # base URL (never the key)
    elapsed_s: float = 0.0
    answers_per_s: float | None = None   # answers stored per second of the live phase
    written: bool = False
    out_path: str | None = None
    synthetic_answers: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        """Plain JSON-serialisable dict."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON (atomically)."""
        path = Path(path)
        atomic.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", path)
        return path

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
        if self.aborted:
            lines.append(f"ABORTED: {self.aborted}")
        if self.out_path:
            lines.append(f"wrote {self.out_path}" if self.written else "")
        elif self.mode != "dry_run" and not self.batches_pending:
            lines.append(f"not written: {self.failed + self.not_attempted} entities lack an answer; rerun to "
                         f"retry them (stored answers are kept), or pass {option('allow_partial=True', '--allow-partial')}")
        if self.note:
            lines.append(self.note)
        return "\n".join(line for line in lines if line)

    def __str__(self) -> str:
        return self.summary()


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
    attempts: int = 0
    rate_limit_wait: float = 0.0


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
class _Scheduler:
    """Hands out jobs: retries whose time has come first, then fresh entities."""

    def __init__(self, jobs: Iterable[_Job]):
        self.pending = collections.deque(jobs)
        self.retry: list[tuple[float, int, _Job]] = []
        self.inflight = 0
        self.stopped: str | None = None
        self._seq = 0
        self._cond = asyncio.Condition()

    async def next(self) -> _Job | None:
        loop = asyncio.get_running_loop()
        async with self._cond:
            while True:
                if self.stopped:
                    return None
                now = loop.time()
                if self.retry and self.retry[0][0] <= now:
                    job = heapq.heappop(self.retry)[2]
                    break
                if self.pending:
                    job = self.pending.popleft()
                    break
                if not self.retry and self.inflight == 0:
                    return None
                timeout = self.retry[0][0] - now if self.retry else None
                try:
                    await asyncio.wait_for(self._cond.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            self.inflight += 1
            return job

    async def finish(self, retry_at: float | None, job: _Job) -> None:
        async with self._cond:
            self.inflight -= 1
            if retry_at is not None:
                self._seq += 1
                heapq.heappush(self.retry, (retry_at, self._seq, job))
            self._cond.notify_all()

    async def stop(self, reason: str) -> None:
        async with self._cond:
            self.stopped = self.stopped or reason
            self._cond.notify_all()

    def left(self) -> int:
        return len(self.pending) + len(self.retry)


class _Gate:
    """Shared pause after a 429: the server said when to come back, so nobody asks before."""

    def __init__(self, rng: random.Random):
        self.until = 0.0
        self.rng = rng

    def hold(self, until: float) -> None:
        self.until = max(self.until, until)

    async def wait(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            delay = self.until - loop.time()
            if delay <= 0:
                return
            # A little jitter so the waiting workers do not all arrive in the same millisecond.
            await asyncio.sleep(delay + self.rng.uniform(0.0, min(0.05, 0.005 + 0.05 * delay)))


class _Pacer:
    """Spaces request starts: a fixed cap (``requests_per_s``) and/or one learnt from 429s.

    Adaptive mode is additive-increase / multiplicative-decrease, as TCP: no cap until the first
    429; then, on each 429 (at most once a second), the cap drops to the success rate of the last
    second or by 10%, whichever is lower; every second of successes raises it by 5% (at least
    1 request/s). The run then sits just under the server's limit instead of bouncing off it with
    every worker: far fewer wasted requests, which matters where rejected requests count against
    the quota (OpenAI's do).
    """

    def __init__(self, fixed: float | None, adaptive: bool):
        self.fixed = fixed
        self.adaptive = adaptive
        self.learnt: float | None = None
        self.next = 0.0
        self.last_decrease = -1e9
        self.successes: collections.deque[float] = collections.deque()

    @property
    def rate(self) -> float | None:
        """Current cap in request starts per second (None: no cap)."""
        caps = [r for r in (self.fixed, self.learnt) if r]
        return min(caps) if caps else None

    async def wait(self) -> None:
        rate = self.rate
        if rate is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self.next)
        self.next = slot + 1.0 / rate
        if slot > now:
            await asyncio.sleep(slot - now)

    def success(self, now: float) -> None:
        if not self.adaptive:
            return
        self.successes.append(now)
        while self.successes and self.successes[0] < now - 1.0:
            self.successes.popleft()
        if self.learnt:
            self.learnt += max(1.0, 0.05 * self.learnt) / self.learnt  # per success: +5%/s (>= 1/s)

    def rate_limited(self, now: float) -> None:
        if not self.adaptive or now - self.last_decrease < 1.0:
            return
        while self.successes and self.successes[0] < now - 1.0:
            self.successes.popleft()
        if not self.successes:
            return  # nothing to estimate from yet: the shared Retry-After pause does the work
        self.last_decrease = now
        observed = float(len(self.successes))  # successes in the last second
        self.learnt = max(1.0, observed if self.learnt is None else min(observed, self.learnt * 0.9))


class _GroupWriter:
    """One thread owns the store's connection and commits answers as they arrive.

    Whatever queued up during a commit goes into the next transaction together (group commit), so
    a slow fsync does not cap the request rate, and commits never block the event loop. An answer
    counts as done only once its commit returned; the worker meanwhile sends its next request.
    """

    def __init__(self, store: Store, loop: asyncio.AbstractEventLoop):
        self.store = store
        self.loop = loop
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="dimkit-store", daemon=True)
        self.thread.start()

    def put(self, key: str, value: Any, item: str, *, kind: str, model: str, version: str) -> asyncio.Future:
        """Queue one answer; the future resolves once it is committed."""
        fut = self.loop.create_future()
        self.queue.put(("put", (key, value, item), (kind, model, version), fut))
        return fut

    async def put_failure(self, key: str, *, kind: str, model: str, version: str, item: str, reason: str,
                          detail: str | None) -> None:
        fut = self.loop.create_future()
        self.queue.put(("fail", dict(key=key, kind=kind, model=model, version=version, item=item,
                                     reason=reason, detail=detail), None, fut))
        await fut

    async def close(self) -> None:
        """Commit what is queued, close the connection, stop the thread."""
        fut = self.loop.create_future()
        self.queue.put(("close", None, None, fut))
        await fut
        self.thread.join()

    def _settle(self, fut: asyncio.Future, exc: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)
        self.loop.call_soon_threadsafe(settle)

    def _serve(self) -> None:
        while True:
            msgs = [self.queue.get()]
            while True:
                try:
                    msgs.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[tuple, list] = {}
            for op, payload, group, fut in msgs:
                if op == "put":
                    groups.setdefault(group, []).append((payload, fut))
            for (kind, model, version), rows in groups.items():
                try:
                    self.store.put_many([r for r, _ in rows], kind=kind, model=model, version=version)
                    err = None
                except BaseException as exc:  # handed to the awaiting worker, which raises it
                    err = exc
                for _, fut in rows:
                    self._settle(fut, err)
            closing = None
            for op, payload, _, fut in msgs:
                if op == "fail":
                    try:
                        self.store.put_failure(**payload)
                        self._settle(fut, None)
                    except BaseException as exc:
                        self._settle(fut, exc)
                elif op == "close":
                    closing = fut
            if closing is not None:
                self.store.close()
                self._settle(closing, None)
                return


def _backoff(attempt: int, cfg: AugmentConfig, rng: random.Random) -> float:
    """Exponential backoff with 'equal jitter': half fixed, half random."""
    ceiling = min(cfg.backoff_max_s, cfg.backoff_base_s * 2 ** (attempt - 1))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


async def _run_live(jobs: list[_Job], *, client: ChatClient, cfg: AugmentConfig, template: Template,
                    store: Store, report: AugmentReport, pbar: Any) -> None:
    loop = asyncio.get_running_loop()
    try:
        await client.check()  # one clear error before any work if the endpoint is down or the key is bad
    except BaseException:
        await client.aclose()
        raise
    rng = random.Random(cfg.seed)
    gate = _Gate(rng)
    pacer = _Pacer(cfg.requests_per_s, cfg.adaptive_rate)
    sched = _Scheduler(jobs)
    writer = _GroupWriter(store, loop)
    commits: set[asyncio.Future] = set()
    store_errors: list[BaseException] = []
    errors: collections.Counter[str] = collections.Counter()
    failed: collections.Counter[str] = collections.Counter()

    def show() -> None:
        pbar.set_postfix(done=report.done, cached=report.cached + report.imported, failed=report.failed,
                         refresh=False)

    async def fail(job: _Job, err: LLMError) -> None:
        await writer.put_failure(job.key, kind=KIND, model=cfg.model, version=template.id,
                                 item=job.qid, reason=err.reason, detail=err.detail)
        report.failed += 1
        failed[err.reason] += 1
        if len(report.failed_examples) < 20:
            report.failed_examples.append({"qid": job.qid, "name": job.name, "reason": err.reason,
                                           "detail": err.detail})
        pbar.update(1)
        show()

    async def attempt(job: _Job) -> float | None:
        """Send one request for ``job``; returns when to retry it, or None when it is settled."""
        await gate.wait()
        await pacer.wait()
        if sched.stopped:
            return None
        report.requests += 1
        try:
            answer: Completion = await client.chat(cfg.model, job.messages, max_tokens=template.max_tokens,
                                                   temperature=template.temperature)
        except LLMError as err:
            return await on_error(job, err)
        value = {"description": answer.text, "qid": job.qid, "name": job.name, "model": cfg.model,
                 "template": template.id, "response_model": answer.model,
                 "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
                 "completion_tokens": answer.completion_tokens}
        pacer.success(loop.time())
        commit = writer.put(job.key, value, job.qid, kind=KIND, model=cfg.model, version=template.id)
        commits.add(commit)
        commit.add_done_callback(lambda fut, answer=answer: committed(fut, answer))
        return None

    def committed(fut: asyncio.Future, answer: Completion) -> None:
        commits.discard(fut)
        if fut.cancelled() or fut.exception() is not None:  # e.g. disk full: stop, do not lose more
            store_errors.append(fut.exception() if not fut.cancelled() else asyncio.CancelledError())
            sched.stopped = sched.stopped or f"store write failed: {store_errors[0]!r}"
            return
        report.done += 1
        report.prompt_tokens += answer.prompt_tokens or 0
        report.completion_tokens += answer.completion_tokens or 0
        pbar.update(1)
        show()

    async def on_error(job: _Job, err: LLMError) -> float | None:
        errors[err.reason] += 1
        now = loop.time()
        if err.fatal:
            await fail(job, err)
            await sched.stop(f"{err.reason}: {err.detail}")
            return None
        if err.reason == "rate_limited":
            report.rate_limited += 1
            pacer.rate_limited(now)
            if err.retry_after is not None:
                # The server said when: not an error of this entity, so no attempt is used up, but
                # the total wait is bounded (a 429 that never ends is an exhausted quota).
                job.rate_limit_wait += err.retry_after
                if job.rate_limit_wait > cfg.rate_limit_wait_s:
                    await fail(job, LLMError("rate_limited", f"still rate limited after waiting "
                                             f"{job.rate_limit_wait:.0f} s: {err.detail}"))
                    return None
                gate.hold(now + err.retry_after)
                report.retries += 1
                return now + err.retry_after
        if err.retryable:
            job.attempts += 1
            if job.attempts >= cfg.max_attempts:
                await fail(job, LLMError(err.reason, f"gave up after {job.attempts} attempts: {err.detail}",
                                         status=err.status))
                return None
            delay = max(_backoff(job.attempts, cfg, rng), err.retry_after or 0.0)
            if err.reason == "rate_limited":
                gate.hold(now + delay)
            report.retries += 1
            return now + delay
        await fail(job, err)  # malformed, empty, bad request: retried on the next run, not now
        return None

    async def worker() -> None:
        while (job := await sched.next()) is not None:
            retry_at = None
            try:
                retry_at = await attempt(job)
            finally:
                await sched.finish(retry_at, job)

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, len(jobs)))))
    finally:
        if commits:  # answers received: wait for their commits (milliseconds), even when interrupted
            await asyncio.gather(*list(commits), return_exceptions=True)
        await writer.close()
        await client.aclose()
        elapsed = time.perf_counter() - t0
        report.answers_per_s = round(report.done / elapsed, 2) if elapsed > 0 and report.done else None
        report.failed_by_reason = dict(failed)
        report.errors_by_reason = dict(errors)
        report.aborted = sched.stopped
        report.not_attempted = sched.left() if sched.stopped else 0
    if store_errors:
        raise DimkitError(f"writing to the store {store.path} failed: {store_errors[0]!r}; answers "
                          "committed before it are kept") from store_errors[0]


def _run_coroutine(factory: Callable[[], Any]) -> Any:
    """Run a coroutine to completion, also from inside Jupyter's running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(lambda: asyncio.run(factory())).result()


# ---------------------------------------------------------------------------------------------
# Batch API mode
# ---------------------------------------------------------------------------------------------
def _batch_reason(status_code: Any, error: Any) -> str:
    code = status_code if isinstance(status_code, int) else None
    if code == 429:
        return "rate_limited"
    if code is not None and code >= 500:
        return "server_error"
    if code in (401, 403):
        return "auth"
    if code is not None and code != 200:
        return "bad_request"
    code_text = str(error.get("code", "")) if isinstance(error, dict) else ""
    if "rate_limit" in code_text:
        return "rate_limited"
    if "server_error" in code_text:
        return "server_error"
    return "batch_error" if error else "malformed"


def _run_batch(todo: list[_Job], *, endpoint: Endpoint, cfg: AugmentConfig, template: Template,
               store: Store, report: AugmentReport, wait: bool, pbar: Any) -> None:
    """Submit what is missing as Batch API jobs (half price), poll them, ingest answers into the store.

    Each submitted batch is recorded in the store (kind ``llm_batch``) the moment it is created, so
    an interrupted run resumes polling it on the next run instead of paying for it twice.
    """
    client = BatchClient(endpoint, timeout_s=cfg.timeout_s)  # raises before any work if no key
    client.check()
    by_key = {j.key: j for j in todo}
    pending = []
    for rec in store.items(BATCH_KIND):
        v = rec["value"]
        if (rec["model"] == cfg.model and rec["version"] == template.id and v.get("state") == "submitted"
                and by_key.keys() & set(v["keys"])):
            pending.append((rec["key"], v))
            report.batches.append({"id": v["batch_id"], "requests": len(v["keys"]), "status": "resumed",
                                   "resumed": True})
    covered = {k for _, v in pending for k in v["keys"]}
    fresh = [j for j in todo if j.key not in covered]
    for i in range(0, len(fresh), cfg.batch_max_requests):
        chunk = fresh[i:i + cfg.batch_max_requests]
        lines = [{"custom_id": j.key, "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": cfg.model, "messages": j.messages, "max_tokens": template.max_tokens,
                           "temperature": template.temperature}} for j in chunk]
        info = client.submit(lines, metadata={"dimkit": f"{cfg.model} {template.id}"})
        value = {**info, "keys": [j.key for j in chunk], "qids": [j.qid for j in chunk], "state": "submitted",
                 "submitted": time.time()}
        key = make_key(BATCH_KIND, cfg.model, template.id, {"batch_id": info["batch_id"]})
        store.put(key, value, kind=BATCH_KIND, model=cfg.model, version=template.id, item=info["batch_id"])
        pending.append((key, value))
        report.requests += len(chunk)  # chat requests submitted (in one upload)
        report.batches.append({"id": info["batch_id"], "requests": len(chunk), "status": "submitted",
                               "resumed": False})
    failed: collections.Counter[str] = collections.Counter(report.failed_by_reason)
    while pending and wait:
        for key, value in list(pending):
            st = client.status(value["batch_id"])
            if st["status"] not in BATCH_FINAL:
                continue
            _ingest_batch(client, value, st, by_key, cfg=cfg, template=template, store=store, report=report,
                          failed=failed, pbar=pbar)
            value = {**value, "state": "ingested", "status": st["status"]}
            store.put(key, value, kind=BATCH_KIND, model=cfg.model, version=template.id, item=value["batch_id"])
            pending = [p for p in pending if p[0] != key]
            for b in report.batches:
                if b["id"] == value["batch_id"]:
                    b["status"] = st["status"]
        if pending:
            time.sleep(cfg.batch_poll_s)
    report.batches_pending = len(pending)
    report.failed_by_reason = dict(failed)


def _ingest_batch(client: BatchClient, value: dict, st: dict, by_key: dict[str, _Job], *, cfg: AugmentConfig,
                  template: Template, store: Store, report: AugmentReport,
                  failed: collections.Counter, pbar: Any) -> None:
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
                failures.append((job, LLMError(_batch_reason(resp.get("status_code"), item.get("error")),
                                               str(item.get("error") or resp.get("body"))[:300])))
                continue
            try:
                answer = parse_completion(json.dumps(resp.get("body")))
            except LLMError as err:
                failures.append((job, err))
                continue
            rows.append((key, {"description": answer.text, "qid": job.qid, "name": job.name, "model": cfg.model,
                               "template": template.id, "response_model": answer.model,
                               "finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
                               "completion_tokens": answer.completion_tokens,
                               "batch_id": value["batch_id"]}, job.qid))
            report.prompt_tokens += answer.prompt_tokens or 0
            report.completion_tokens += answer.completion_tokens or 0
    for key in value["keys"]:
        if key not in seen and key in by_key:
            failures.append((by_key[key], LLMError(f"batch_{st['status']}", "no result line for this request")))
    store.put_many(rows, kind=KIND, model=cfg.model, version=template.id)
    for job, err in failures:
        store.put_failure(job.key, kind=KIND, model=cfg.model, version=template.id, item=job.qid,
                          reason=err.reason, detail=err.detail)
        failed[err.reason] += 1
        if len(report.failed_examples) < 20:
            report.failed_examples.append({"qid": job.qid, "name": job.name, "reason": err.reason,
                                           "detail": err.detail})
    report.done += len(rows)
    report.failed += len(failures)
    pbar.update(len(rows) + len(failures))


# ---------------------------------------------------------------------------------------------
# Writing the '+' dataset
# ---------------------------------------------------------------------------------------------
def _image_paths(ds: datasets.Dataset) -> Iterable[str]:
    for col in ("image",):
        for v in ds.mentions[col]:
            if isinstance(v, str) and v:
                yield v
    for frame, col in ((ds.mentions, "images"), (ds.entities, "images")):
        if col in frame.columns:
            for lst in frame[col]:
                if lst is None or isinstance(lst, float):
                    continue
                for v in lst:
                    if isinstance(v, str) and v:
                        yield v


def link_images(source: datasets.Dataset, out_root: Path) -> list[str]:
    """Link the source's image folders into the '+' dataset; returns the linked names.

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
        link = out_root / top
        rel = os.path.relpath(target, out_root)
        if link.is_symlink():
            if os.readlink(link) == rel:
                linked.append(top)
                continue
        elif link.exists():
            raise DimkitError(f"{link} exists and is not a link to the source's images; remove it and rerun")
        tmp = out_root / f".{top}.link-tmp"
        tmp.unlink(missing_ok=True)
        try:
            os.symlink(rel, tmp, target_is_directory=target.is_dir())
        except OSError as exc:  # e.g. Windows without the symlink privilege
            raise DimkitError(f"cannot link the source images into {out_root} ({exc}); enable symlinks "
                              "(Windows: Developer Mode) and rerun") from None
        os.replace(tmp, link)
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
    stage = out_root.with_name(f".{out_root.name}.build-{os.getpid()}-{time.time_ns()}")
    try:
        stage.mkdir(parents=True)
        meta["image_links"] = link_images(ds, stage)
        datasets.write_prepared(stage, ds.mentions, ents, meta, candidates=ds.candidates, source=out_root)
        atomic.swap_in(stage, out_root)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
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


def check_out(out_root: Path, ds: datasets.Dataset, cfg: AugmentConfig, template: Template, force: bool) -> None:
    """Refuse an ``out`` folder that holds a dataset this augment run did not build (unless ``force``).

    "This run's" means built by ``dimkit augment`` from the same source with the same model and
    template; anything else there (another prepared dataset, another augmentation, stray files)
    would be lost.
    """
    if force or not (out_root.exists() or out_root.is_symlink()):
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
def augment(name: str, out: str | None = None, *, model: str | None = None, template: str | None = None,
            concurrency: int | None = None, replay: bool = False, dry_run: bool = False,
            batch: bool = False, batch_wait: bool = True, base_url: str | None = None,
            api_key: str | None = None, answers: str | Path | None = None, allow_partial: bool = False,
            force: bool = False, store: Store | str | Path | None = None,
            data_dir: str | Path | None = None, progress: bool = True,
            prices: Mapping[str, tuple[float, float]] | None = None,
            config: AugmentConfig | None = None, **options: Any) -> AugmentReport:
    """Write ``out`` (default ``<name>+``) with an LLM description of every entity of ``name``.

    Args:
        replay: never call an LLM; every answer must already be stored (or come from ``answers`` or
            the file shipped with the dataset); a missing one raises naming the entity.
        dry_run: only count what is stored and estimate the tokens and cost of the rest.
        batch: send what is missing through the OpenAI Batch API (half price, up to 24 h) instead of
            live requests; ``batch_wait=False`` submits and returns, a rerun collects the results.
        base_url, api_key: the endpoint; default ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``.
        answers: a JSON file of answers to import first (see :func:`import_answers`).
        allow_partial: write the dataset even if some entities failed (they keep the original).
        force: replace ``out`` even if it holds a dataset this run did not build (another prepared
            dataset, another model's or template's augmentation); it is replaced whole, never merged.
        options: any other :class:`AugmentConfig` field (``max_attempts``, ``timeout_s``, ...).
    """
    cfg = AugmentConfig(**asdict(config)) if config is not None else AugmentConfig()
    known = {f.name for f in fields(AugmentConfig)}
    for key, value in dict(model=model, template=template, concurrency=concurrency, **options).items():
        if key not in known:
            raise ConfigError(f"unknown option {key!r}; known: {', '.join(sorted(known))}")
        if value is not None:
            setattr(cfg, key, value)
    cfg.validate()
    tmpl = get_template(cfg.template)
    cfg.template = tmpl.id

    ds = datasets.load(name, data_dir)
    if datasets.is_augmented(ds.name):
        raise ConfigError(f"{ds.name!r} is already an augmented dataset; augment its source "
                          f"{datasets.base_name(ds.name)!r}")
    out = datasets.canonical_name(out or f"{ds.name}+")
    if out == ds.name:
        raise ConfigError("out must differ from the source dataset")

    own_store = not isinstance(store, Store)
    if own_store:
        store = Store(store if store is not None else default_store_path("llm"))
    try:
        return _augment(ds, out, cfg, tmpl, store=store, replay=replay, dry_run=dry_run, batch=batch,
                        batch_wait=batch_wait, base_url=base_url, api_key=api_key, answers=answers,
                        allow_partial=allow_partial, force=force, data_dir=data_dir, progress=progress,
                        prices=prices)
    finally:
        if own_store:
            store.close()


def _augment(ds: datasets.Dataset, out: str, cfg: AugmentConfig, tmpl: Template, *, store: Store,
             replay: bool, dry_run: bool, batch: bool, batch_wait: bool, base_url: str | None,
             api_key: str | None, answers: str | Path | None, allow_partial: bool, force: bool,
             data_dir: str | Path | None, progress: bool,
             prices: Mapping[str, tuple[float, float]] | None) -> AugmentReport:
    mode = "dry_run" if dry_run else ("replay" if replay else ("batch" if batch else "live"))
    report = AugmentReport(dataset=ds.name, out=out, model=cfg.model, template=tmpl.id, mode=mode)
    t0 = time.perf_counter()
    jobs = _jobs(ds.entities, cfg.model, tmpl)
    report.entities = len(jobs)
    report.cached = len(store.get_many(j.key for j in jobs))

    answers_path = Path(answers) if answers is not None else None
    if answers_path is not None:
        file_model = _load_answers_file(answers_path).get("model")
        if file_model and file_model != cfg.model:
            raise ConfigError(f"{answers_path} holds answers of model {file_model!r}, but model is {cfg.model!r}")
    else:
        bundled = _bundled_answers(ds)
        if bundled is not None and _load_answers_file(bundled).get("model") == cfg.model:
            answers_path = bundled
    if answers_path is not None and not dry_run:
        tspec = _load_answers_file(answers_path).get("template")
        if tspec and get_template(tspec).name != tmpl.name:
            raise ConfigError(f"{answers_path} holds answers to template {tspec!r}, not {tmpl.id!r}")
        report.imported = import_answers(answers_path, ds, model=cfg.model, template=tmpl, store=store)

    values = store.get_many(j.key for j in jobs)
    todo = [j for j in jobs if j.key not in values]
    report.requested = len(todo)
    report.synthetic_answers = any(v.get("synthetic") for v in values.values())
    if report.synthetic_answers:
        report.note = ("NOTE: these descriptions are SYNTHETIC oracle answers shipped with the sample "
                       "(model 'sample-oracle'), not an LLM's.")

    if dry_run:
        _estimate(report, todo, store, cfg, tmpl, prices, answers_path)
        report.elapsed_s = round(time.perf_counter() - t0, 3)
        return report
    if replay and todo:
        first = todo[0]
        raise DimkitError(
            f"replay: no stored answer for entity {first.qid} ({first.name!r}) of {ds.name!r} "
            f"[model {cfg.model}, template {tmpl.id}]; {len(todo)} of {len(jobs)} entities lack one. "
            f"Run without replay to request them, or import answers with {option('answers=FILE', '--answers FILE')}.")
    # before any request: a run that could not write its result must not spend money first
    check_out(datasets.dataset_dir(out, data_dir), ds, cfg, tmpl, force)

    if todo:
        endpoint = Endpoint.resolve(base_url, api_key)
        report.endpoint = endpoint.public_url
        bar_kwargs = {} if progress else {"disable": True}
        if batch:
            with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"augment {ds.name} (batch)",
                      unit="entity", **bar_kwargs) as pbar:
                _run_batch(todo, endpoint=endpoint, cfg=cfg, template=tmpl, store=store, report=report,
                           wait=batch_wait, pbar=pbar)
        else:
            client = ChatClient(endpoint, timeout_s=cfg.timeout_s)  # raises before any work if no key
            with tqdm(total=len(jobs), initial=len(jobs) - len(todo), desc=f"augment {ds.name}",
                      unit="entity", **bar_kwargs) as pbar:
                _run_coroutine(lambda: _run_live(todo, client=client, cfg=cfg, template=tmpl, store=store,
                                                 report=report, pbar=pbar))
        price = price_of(cfg.model, prices)
        if price is not None:
            report.cost_usd = round(estimate_cost(cfg.model, report.prompt_tokens, report.completion_tokens,
                                                  prices=prices, batch=batch), 6)
        values = store.get_many(j.key for j in jobs)
    else:
        report.cost_usd = 0.0

    missing = sum(1 for j in jobs if j.key not in values)
    if missing == 0 or allow_partial:
        root = _write_plus(ds, out, values, jobs, cfg, tmpl, report, data_dir)
        report.written = True
        report.out_path = str(root)
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    report_path = paths.runs_dir() / "augment" / f"{out}.json"
    report.save(report_path)
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


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dimkit augment``."""
    d = AugmentConfig()
    parser.add_argument("dataset", help="source dataset (e.g. sample, wikimel, richpediamel, wikidiverse)")
    parser.add_argument("--out", help="output dataset name (default: <dataset>+)")
    parser.add_argument("--model", default=d.model, help=f"model id at the endpoint (default {d.model}; "
                        f"'{SAMPLE_ORACLE}' replays the sample's synthetic answers)")
    parser.add_argument("--template", default=d.template,
                        help=f"prompt template name[@version] (known: {', '.join(list_templates())})")
    parser.add_argument("--concurrency", type=int, default=d.concurrency, help="requests in flight")
    parser.add_argument("--replay", action="store_true", help="use stored answers only; never call the LLM")
    parser.add_argument("--dry-run", action="store_true",
                        help="count stored answers and estimate tokens and cost; call nothing")
    parser.add_argument("--batch", action="store_true",
                        help="use the OpenAI Batch API (half price, results within 24 h) instead of live requests")
    parser.add_argument("--no-wait", action="store_true",
                        help="with --batch: submit and return; rerun the same command to collect the results")
    parser.add_argument("--poll", type=float, default=d.batch_poll_s, help="with --batch: seconds between polls")
    parser.add_argument("--answers", help="JSON file of answers to import first ({qid: text} or "
                        "{model, template, answers})")
    parser.add_argument("--allow-partial", action="store_true",
                        help="write the dataset even if some entities failed (they keep the original)")
    parser.add_argument("--force", action="store_true",
                        help="replace --out even if it holds a dataset this run did not build (replaced whole)")
    parser.add_argument("--max-attempts", type=int, default=d.max_attempts)
    parser.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds per request")
    parser.add_argument("--requests-per-s", type=float, default=None,
                        help="client-side cap on request starts per second")
    parser.add_argument("--no-adaptive-rate", action="store_true",
                        help="do not learn a request-rate cap from 429s (Retry-After is still honoured)")
    parser.add_argument("--report", help="also write the report JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    """``dimkit augment``: endpoint and key from OPENAI_BASE_URL / OPENAI_API_KEY."""
    report = augment(args.dataset, args.out, model=args.model, template=args.template,
                     concurrency=args.concurrency, replay=args.replay, dry_run=args.dry_run,
                     batch=args.batch, batch_wait=not args.no_wait, batch_poll_s=args.poll,
                     answers=args.answers, allow_partial=args.allow_partial, force=args.force,
                     max_attempts=args.max_attempts, timeout_s=args.timeout,
                     requests_per_s=args.requests_per_s, adaptive_rate=not args.no_adaptive_rate,
                     progress=not args.quiet)
    print(report.summary())
    if args.report:
        report.save(args.report)
    return 0 if (report.written or report.mode == "dry_run" or report.batches_pending) else 1
