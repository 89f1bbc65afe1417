"""One strict client for any OpenAI-compatible chat endpoint, shared by :mod:`dimkit.augment` and
:class:`dimkit.experts.OpenAIExpert`.

OpenAI, Azure OpenAI, vLLM, Ollama and llama.cpp servers all speak the same protocol; the official
``openai`` client talks to them and retries what is worth retrying: 429 (after the server's
``Retry-After``), 408/409, 5xx, timeouts and dropped connections, with exponential backoff, up to
``max_retries`` times a request. :class:`ChatClient` adds what a long unattended run needs on top:

- a completion that is not well-formed JSON with a non-empty message is never an answer; it is
  asked again, up to ``max_attempts`` requests, then fails as ``malformed`` or ``empty``;
- every failure is an :class:`LLMError` with a short ``reason`` (``rate_limited``, ``server_error``,
  ``timeout``, ``connection``, ``malformed``, ``empty``, ``auth``, ``not_found``, ``bad_request``);
- every HTTP attempt (the client's retries included) is counted by outcome, and paced by a
  :class:`Pacer`: an optional fixed cap, and a cap learnt from 429s;
- the Batch API calls (upload, create, poll, download) for half-price runs.

The endpoint and key come from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` or explicit arguments; the
key is never printed, stored or put in a report (:class:`Endpoint` hides it from ``repr``).
"""
from __future__ import annotations

import collections
import email.utils
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError, DimkitError

DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: Answers asked again (up to ``max_attempts`` requests) before they count as failed.
CONTENT_FAILURES = frozenset({"malformed", "empty"})
#: Failures that make every further request pointless (a bad key, a model the endpoint lacks, an
#: account whose quota or credit is spent: OpenAI answers that with a 429 no wait will cure).
FATAL = frozenset({"auth", "not_found", "quota"})
#: The error code of a 429 that is a spent quota, not a rate limit.
QUOTA_CODE = "insufficient_quota"

#: Approximate list prices in USD per 1M tokens (input, output) at the time of writing, for the
#: cost estimate only. Providers change them: check the pricing page, or pass ``prices=``.
#: Matched by longest prefix, so dated snapshots ("gpt-4o-mini-2024-07-18") find their family.
PRICES_USD_PER_1M: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "sample-oracle": (0.0, 0.0),
}
#: The Batch API bills half the synchronous price.
BATCH_DISCOUNT = 0.5


def redact_url(url: str | None) -> str | None:
    """The URL without user info, query or fragment (where a key could hide)."""
    if not url:
        return url
    parts = urlsplit(url)
    # the host and port as written, after any user info: never parsed, so a bad port cannot raise here
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_base_url(url: str, source: str = "OPENAI_BASE_URL") -> None:
    """Raise ConfigError unless ``url`` is an http(s) URL with a host and a valid port; ``source`` names
    where it came from. The message shows the URL redacted (no user info, no query)."""
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{source} {redact_url(url)!r} is not an http(s) URL; set it to the endpoint's "
                          "base URL, e.g. http://localhost:8000/v1")
    parts = urlsplit(url)
    try:
        parts.port  # raises for a port that is not a number in 0..65535 ("h:99999", "h:8000:")
    except ValueError:
        raise ConfigError(f"{source} {redact_url(url)!r} is not a valid URL (the port must be a number in "
                          "0..65535); set it to the endpoint's base URL, e.g. http://localhost:8000/v1") from None
    if not parts.hostname:
        raise ConfigError(f"{source} {redact_url(url)!r} is not a valid URL (no host); set it to the "
                          "endpoint's base URL, e.g. http://localhost:8000/v1")


def scrub(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` replaced, cut to 300 characters."""
    if secret:
        text = text.replace(secret, "***")
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and the key they carry (the key is never shown)."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, base_url: str | None = None, api_key: str | None = None) -> "Endpoint":
        """Explicit arguments first, then ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``."""
        url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).strip()
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        key = key.strip() if key else None
        check_base_url(url, "base_url" if base_url else "OPENAI_BASE_URL")
        return cls(base_url=url.rstrip("/"), api_key=key or None)

    @property
    def public_url(self) -> str:
        """The base URL safe to print."""
        return redact_url(self.base_url) or ""

    def __repr__(self) -> str:
        return f"Endpoint(base_url={self.public_url!r}, api_key={'<set>' if self.api_key else '<missing>'})"


class LLMError(Exception):
    """One failed chat request: ``reason`` is a short category, ``detail`` a (scrubbed) message."""

    def __init__(self, reason: str, detail: str = "", *, status: int | None = None):
        self.reason = reason
        self.detail = detail
        self.status = status
        super().__init__(f"{reason}: {detail}" if detail else reason)

    @property
    def fatal(self) -> bool:
        """Every further request would fail the same way."""
        return self.reason in FATAL


@dataclass
class Completion:
    """A usable answer: its text and token usage."""

    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    finish_reason: str | None = None


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms`` (OpenAI), else ``Retry-After``."""
    if not headers:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            secs = float(value) / scale
        except ValueError:
            continue
        if math.isfinite(secs) and secs >= 0:
            return secs
    value = headers.get("retry-after")
    if value:
        try:
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return None


#: Keys at least this long are masked in answers; real API keys are far longer, while a local server's
#: dummy key ("x", "test") would otherwise mangle ordinary words.
MASKED_KEY_LENGTH = 20


def parse_completion(body: bytes | str, secret: str | None = None) -> Completion:
    """Read a chat.completion body; raise ``LLMError('malformed'|'empty')`` unless it holds an answer.
    ``secret`` (the API key), should an answer ever echo it, is masked before the text is stored."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LLMError("malformed", f"response is not JSON ({exc.msg if hasattr(exc, 'msg') else exc})")
    if not isinstance(data, dict):
        raise LLMError("malformed", "response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LLMError("malformed", "response has no choices")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise LLMError("malformed", "first choice has no message")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise LLMError("malformed", f"message content is {type(content).__name__}, not text")
    finish = choices[0].get("finish_reason")
    if not content or not content.strip():
        raise LLMError("empty", f"empty message content (finish_reason={finish!r})")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}

    def _int(v: Any) -> int | None:
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    text = content.strip()
    if secret and len(secret) >= MASKED_KEY_LENGTH:  # a short dummy key ("x" for a local server) is no secret
        text = text.replace(secret, "***")
    return Completion(text=text, prompt_tokens=_int(usage.get("prompt_tokens")),
                      completion_tokens=_int(usage.get("completion_tokens")),
                      model=data.get("model") if isinstance(data.get("model"), str) else None,
                      finish_reason=finish if isinstance(finish, str) else None)


def status_reason(status: int) -> str:
    """The failure category of an HTTP status (``ok`` below 400)."""
    if status < 400:
        return "ok"
    return {429: "rate_limited", 401: "auth", 403: "auth", 404: "not_found", 408: "timeout",
            409: "server_error"}.get(status, "server_error" if status >= 500 else "bad_request")


def classify(exc: BaseException, secret: str | None = None) -> LLMError:
    """Map an ``openai`` exception (or a transport error) to an :class:`LLMError`."""
    import openai

    if isinstance(exc, LLMError):
        return exc
    detail = scrub(f"{type(exc).__name__}: {exc}", secret)
    if isinstance(exc, openai.APITimeoutError):  # before APIConnectionError: it is a subclass
        return LLMError("timeout", detail)
    if isinstance(exc, openai.APIConnectionError):
        return LLMError("connection", detail)
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429 and QUOTA_CODE in (getattr(exc, "code", None), getattr(exc, "type", None)):
            return LLMError("quota", detail + " (the account's quota or credit is spent: top it up, then rerun; "
                            "what is stored is kept)", status=429)
        return LLMError(status_reason(exc.status_code), detail, status=exc.status_code)
    if isinstance(exc, openai.APIResponseValidationError):
        return LLMError("malformed", detail)
    return LLMError("connection", detail)


def _require_key(endpoint: Endpoint) -> None:
    if not endpoint.api_key:
        raise DimkitError(
            "no API key: set OPENAI_API_KEY in the environment (any non-empty value for local "
            "servers such as vLLM or Ollama), or pass api_key= in code. Keys are never notebook "
            "parameters.")


class Pacer:
    """Spaces request starts: a fixed cap (``fixed`` a second) and/or one learnt from 429s.

    Adaptive mode is additive-increase / multiplicative-decrease, as TCP: no cap until the first
    429; then, on each 429 (at most once a second), the cap drops to the success rate of the last
    second or by 10%, whichever is lower; every second of successes raises it by 5% (at least
    1 request/s), or by 25% until the second 429, since the first estimate, taken right after the
    start-up burst, is low (TCP's slow start). A run then sits just under the server's limit
    instead of every worker bouncing off it, which matters where rejected requests count against
    the quota (OpenAI's do). A 429's ``Retry-After`` also holds back every other request until then.
    """

    def __init__(self, fixed: float | None = None, adaptive: bool = True):
        self.fixed = fixed
        self.adaptive = adaptive
        self.learnt: float | None = None
        self._next = 0.0
        self._hold = 0.0
        self._last_decrease = -1e9
        self._cuts = 0
        self._successes: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    @property
    def rate(self) -> float | None:
        """Current cap in request starts per second (None: no cap)."""
        caps = [r for r in (self.fixed, self.learnt) if r]
        return min(caps) if caps else None

    def wait(self) -> None:
        """Block until this request may start."""
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._hold)
            rate = self.rate
            if rate:
                slot = max(slot, self._next)
                self._next = slot + 1.0 / rate
        if slot > now:
            time.sleep(slot - now)

    def success(self, now: float) -> None:
        """A request was answered at ``now`` (monotonic seconds)."""
        if not self.adaptive:
            return
        with self._lock:
            self._successes.append(now)
            while self._successes[0] < now - 1.0:
                self._successes.popleft()
            if self.learnt:
                growth = 0.05 if self._cuts > 1 else 0.25  # per second; fast until the second 429
                self.learnt += max(1.0, growth * self.learnt) / self.learnt  # spread over the successes

    def rate_limited(self, now: float, retry_after: float | None = None) -> None:
        """A request got 429 at ``now``; ``retry_after``: the seconds the server asked for."""
        with self._lock:
            if retry_after:
                self._hold = max(self._hold, now + retry_after)
            if not self.adaptive or now - self._last_decrease < 1.0:
                return
            while self._successes and self._successes[0] < now - 1.0:
                self._successes.popleft()
            if not self._successes:
                return  # nothing to estimate from yet: the Retry-After hold does the work
            self._last_decrease = now
            self._cuts += 1
            observed = float(len(self._successes))  # successes in the last second
            self.learnt = max(1.0, observed if self.learnt is None else min(observed, self.learnt * 0.9))


def _http_client(pacer: Pacer, tally: collections.Counter, lock: threading.Lock):
    """The openai client's own HTTP client, with every chat request paced and counted by outcome.

    It sits under the openai client's retry loop, so each retry is paced and counted too. Overriding
    ``send`` (not the transport) keeps proxies from the environment working.
    """
    import openai

    class _Paced(openai.DefaultHttpxClient):
        def send(self, request, **kwargs):
            if not request.url.path.endswith("/chat/completions"):  # Batch API control calls: not paced
                response = super().send(request, **kwargs)
                _no_retry_if_quota_spent(response)
                return response
            pacer.wait()
            try:
                response = super().send(request, **kwargs)
            except Exception as exc:
                # httpx and httpx2 alike call their timeouts' base class this
                timeout = any(k.__name__ == "TimeoutException" for k in type(exc).__mro__)
                with lock:
                    tally["timeout" if timeout else "connection"] += 1
                raise
            reason = "quota" if _no_retry_if_quota_spent(response) else status_reason(response.status_code)
            with lock:
                tally[reason] += 1
            if reason == "rate_limited":
                pacer.rate_limited(time.monotonic(), parse_retry_after(response.headers))
            elif reason == "ok":
                pacer.success(time.monotonic())
            return response

    return _Paced()


def _no_retry_if_quota_spent(response) -> bool:
    """Whether ``response`` is a 429 saying the quota is spent (``insufficient_quota``) rather than the
    rate too high; if so it is marked ``x-should-retry: false``, since the openai client would otherwise
    retry it ``max_retries`` times, with back-off, for nothing."""
    if response.status_code != 429:
        return False
    try:
        error = json.loads(response.read()).get("error") or {}
    except (ValueError, AttributeError):
        return False
    except Exception:  # the body could not be read (a dropped connection): nothing can use the response
        response.close()
        raise
    if not (isinstance(error, dict) and QUOTA_CODE in (error.get("code"), error.get("type"))):
        return False
    response.headers["x-should-retry"] = "false"
    return True


def _raise_check_error(exc: Exception, endpoint: Endpoint) -> None:
    """Turn a failed endpoint check into one clear DimkitError (a server that answers is reachable)."""
    import openai

    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        raise DimkitError(f"the LLM endpoint {endpoint.public_url} rejected the API key "
                          f"(HTTP {exc.status_code}); check OPENAI_API_KEY") from None
    if isinstance(exc, openai.APIConnectionError):
        detail = scrub(str(exc) or type(exc).__name__, endpoint.api_key)
        raise DimkitError(f"cannot reach the LLM endpoint {endpoint.public_url} ({detail}); "
                          "check OPENAI_BASE_URL and that the server is running") from None
    if isinstance(exc, openai.APIStatusError):
        return  # it answered: reachable (some servers have no /models route)
    raise exc


#: Batch states after which nothing more will happen.
BATCH_FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class BatchNotFound(DimkitError):
    """The endpoint answers 404 for a batch: it was forgotten, or submitted to another endpoint."""

    def __init__(self, batch_id: str, message: str):
        self.batch_id = batch_id
        super().__init__(message)


class ChatClient:
    """Chat completions (and the Batch API) against an :class:`Endpoint`; safe to share between threads.

    ``max_retries``: the openai client's retries of one request (429, 5xx, timeouts, dropped
    connections); ``max_attempts``: requests per answer while it comes back malformed or empty;
    ``requests_per_s`` and ``adaptive_rate`` configure the :class:`Pacer`.
    """

    def __init__(self, endpoint: Endpoint, *, timeout_s: float = 60.0, max_retries: int = 5,
                 max_attempts: int = 3, requests_per_s: float | None = None, adaptive_rate: bool = True):
        import openai

        _require_key(endpoint)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.pacer = Pacer(requests_per_s, adaptive_rate)
        self._tally: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key,
                                     max_retries=max_retries, timeout=timeout_s,
                                     http_client=_http_client(self.pacer, self._tally, self._lock))

    def __repr__(self) -> str:
        return f"ChatClient({self.endpoint!r}, timeout_s={self.timeout_s})"

    def counts(self) -> dict:
        """Chat requests so far: ``calls`` (answers asked for), ``requests`` (HTTP attempts, retries
        included) and ``errors`` (every failed attempt by reason, malformed and empty answers too)."""
        with self._lock:
            tally = dict(self._tally)
        calls, ok = tally.pop("calls", 0), tally.pop("ok", 0)
        content = sum(tally.get(r, 0) for r in CONTENT_FAILURES)  # answered, hence counted as ok too
        return {"calls": calls, "requests": ok + sum(tally.values()) - content, "errors": tally}

    def check(self, timeout_s: float = 10.0) -> None:
        """Fail fast (DimkitError) if the endpoint is unreachable or rejects the key."""
        try:
            self._client.with_options(timeout=timeout_s, max_retries=0).models.list()
        except Exception as exc:
            _raise_check_error(exc, self.endpoint)

    def complete(self, model: str, messages: list[dict], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> Completion:
        """One answer; raises :class:`LLMError` once the retries and attempts are spent."""
        params: dict[str, Any] = {"model": model, "messages": messages}
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if temperature is not None:
            params["temperature"] = temperature
        with self._lock:
            self._tally["calls"] += 1
        attempt = 0
        while True:
            attempt += 1
            try:
                # The raw body, parsed strictly here: broken JSON is a malformed answer to ask again.
                raw = self._client.chat.completions.with_raw_response.create(**params)
            except Exception as exc:
                raise classify(exc, self.endpoint.api_key) from None
            try:
                return parse_completion(raw.http_response.content, self.endpoint.api_key)
            except LLMError as err:
                with self._lock:
                    self._tally[err.reason] += 1
                if attempt == self.max_attempts:
                    raise LLMError(err.reason, f"{err.detail}, {attempt} times") from None

    # -- the Batch API: a handful of control calls a run; the answers are checked by parse_completion
    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = classify(exc, self.endpoint.api_key)
            raise DimkitError(f"Batch API: {what} failed at {self.endpoint.public_url} ({err})") from None

    def submit(self, lines: list[dict], metadata: dict | None = None) -> dict:
        """Upload the request lines and create a batch; returns ``{"batch_id", "input_file_id"}``."""
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        f = self._call("upload", self._client.files.create,
                       file=("dimkit-batch.jsonl", data, "application/jsonl"), purpose="batch")
        b = self._call("create", self._client.batches.create, input_file_id=f.id,
                       endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata)
        return {"batch_id": b.id, "input_file_id": f.id}

    def status(self, batch_id: str) -> dict:
        """``{"status", "output_file_id", "error_file_id", "request_counts"}`` of a batch; raises
        :class:`BatchNotFound` if the endpoint does not know it (HTTP 404)."""
        try:
            b = self._client.batches.retrieve(batch_id)
        except Exception as exc:
            err = classify(exc, self.endpoint.api_key)
            if err.status == 404:
                raise BatchNotFound(batch_id, f"Batch API: the endpoint {self.endpoint.public_url} does not know "
                                              f"batch {batch_id} (HTTP 404)") from None
            raise DimkitError(f"Batch API: poll failed at {self.endpoint.public_url} ({err})") from None
        counts = getattr(b, "request_counts", None)
        return {"status": b.status, "output_file_id": getattr(b, "output_file_id", None),
                "error_file_id": getattr(b, "error_file_id", None),
                "request_counts": counts.model_dump() if hasattr(counts, "model_dump") else counts}

    def download(self, file_id: str) -> str:
        """The text of a result file."""
        return self._call("download", self._client.files.content, file_id).text

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    def __enter__(self) -> "ChatClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def estimate_tokens(text: str) -> int:
    """Rough token count (4 characters a token, the usual rule of thumb for English)."""
    return max(1, math.ceil(len(text) / 4))


def estimate_prompt_tokens(messages: list[dict]) -> int:
    """Rough prompt tokens of a chat request (content plus a few tokens of framing per message)."""
    return 3 + sum(4 + estimate_tokens(str(m.get("content", ""))) for m in messages)


def price_of(model: str, prices: Mapping[str, tuple[float, float]] | None = None) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens of ``model`` by longest matching prefix, or None if unknown."""
    table = dict(PRICES_USD_PER_1M)
    if prices:
        table.update(prices)
    best = None
    for name, price in table.items():
        if model == name or model.startswith(name + "-"):
            if best is None or len(name) > len(best[0]):
                best = (name, price)
    return None if best is None else best[1]


def estimate_cost(model: str, prompt_tokens: float, completion_tokens: float, *,
                  prices: Mapping[str, tuple[float, float]] | None = None,
                  batch: bool = False) -> float | None:
    """Estimated USD for the given token counts (None when the model's price is unknown)."""
    price = price_of(model, prices)
    if price is None:
        return None
    cost = (prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6
    return cost * (BATCH_DISCOUNT if batch else 1.0)
