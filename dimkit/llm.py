"""A thin, strict client for any OpenAI-compatible chat endpoint (used by notebook ``01_augment``).

OpenAI, Azure OpenAI, vLLM, Ollama and llama.cpp servers all speak the same protocol; the official
``openai`` client talks to them. This module adds what a long unattended run needs and the client
leaves to the caller: every failure is turned into an :class:`LLMError` with a short ``reason``
category (``rate_limited``, ``server_error``, ``timeout``, ``connection``, ``malformed``, ``empty``,
``auth``, ``not_found``, ``bad_request``) and the server's ``Retry-After``; a completion that is
not well-formed JSON with a non-empty message is an error, never an answer. The client's own retries
are off (``max_retries=0``): :mod:`dimkit.augment` schedules retries itself, across entities.

The endpoint and key come from ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY`` or explicit arguments; the
key is never printed, stored or put in a report (:class:`Endpoint` hides it from ``repr``).
"""
from __future__ import annotations

import email.utils
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError, DimkitError

DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: Failure categories worth retrying within a run (with backoff); others are recorded at once.
RETRYABLE = frozenset({"rate_limited", "server_error", "timeout", "connection"})
#: Failures that make every further request pointless (a bad key, a model the endpoint lacks).
FATAL = frozenset({"auth", "not_found"})

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
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


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
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"LLM endpoint {redact_url(url)!r} is not an http(s) URL (OPENAI_BASE_URL)")
        return cls(base_url=url.rstrip("/"), api_key=key or None)

    @property
    def public_url(self) -> str:
        """The base URL safe to print."""
        return redact_url(self.base_url) or ""

    def __repr__(self) -> str:
        return f"Endpoint(base_url={self.public_url!r}, api_key={'<set>' if self.api_key else '<missing>'})"


class LLMError(Exception):
    """One failed chat request: ``reason`` is a short category, ``detail`` a (scrubbed) message."""

    def __init__(self, reason: str, detail: str = "", *, status: int | None = None,
                 retry_after: float | None = None):
        self.reason = reason
        self.detail = detail
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"{reason}: {detail}" if detail else reason)

    @property
    def retryable(self) -> bool:
        """Worth another try in this run."""
        return self.reason in RETRYABLE

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


def parse_completion(body: bytes | str) -> Completion:
    """Read a chat.completion body; raise ``LLMError('malformed'|'empty')`` unless it holds an answer."""
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

    return Completion(text=content.strip(), prompt_tokens=_int(usage.get("prompt_tokens")),
                      completion_tokens=_int(usage.get("completion_tokens")),
                      model=data.get("model") if isinstance(data.get("model"), str) else None,
                      finish_reason=finish if isinstance(finish, str) else None)


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
        status = exc.status_code
        retry_after = parse_retry_after(exc.response.headers)
        if status == 429:
            reason = "rate_limited"
        elif status in (401, 403):
            reason = "auth"
        elif status == 404:
            reason = "not_found"
        elif status == 408:
            reason = "timeout"
        elif status == 409 or status >= 500:
            reason = "server_error"
        else:
            reason = "bad_request"
        return LLMError(reason, detail, status=status, retry_after=retry_after)
    if isinstance(exc, openai.APIResponseValidationError):
        return LLMError("malformed", detail)
    return LLMError("connection", detail)


def _require_key(endpoint: Endpoint) -> None:
    if not endpoint.api_key:
        raise DimkitError(
            "no API key: set OPENAI_API_KEY in the environment (any non-empty value for local "
            "servers such as vLLM or Ollama), or pass api_key= in code. Keys are never notebook "
            "parameters.")


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


class ChatClient:
    """Async chat completions against an :class:`Endpoint`, no retries, strict parsing."""

    def __init__(self, endpoint: Endpoint, *, timeout_s: float = 60.0):
        import openai

        _require_key(endpoint)
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._client = openai.AsyncOpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key,
                                          max_retries=0, timeout=timeout_s)

    def __repr__(self) -> str:
        return f"ChatClient({self.endpoint!r}, timeout_s={self.timeout_s})"

    async def check(self, timeout_s: float = 10.0) -> None:
        """Fail fast (DimkitError) if the endpoint is unreachable or rejects the key."""
        try:
            await self._client.with_options(timeout=timeout_s).models.list()
        except Exception as exc:
            _raise_check_error(exc, self.endpoint)

    async def chat(self, model: str, messages: list[dict], *, max_tokens: int | None = None,
                   temperature: float | None = None) -> Completion:
        """One chat completion; raises :class:`LLMError` on any failure."""
        kwargs: dict[str, Any] = {"model": model, "messages": messages}
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if temperature is not None:
            kwargs["temperature"] = temperature
        try:
            # The client's generic POST (its documented route for raw bodies): same auth, base URL,
            # timeouts and error types as ``chat.completions.create``, without re-validating the
            # request params (about 3 ms of CPU a request, a bottleneck at 60+ requests/s) or
            # building a response model we would re-check anyway.
            body = await self._client.post("/chat/completions", cast_to=bytes, body=kwargs)
        except Exception as exc:  # every transport/status error becomes a categorised LLMError
            raise classify(exc, self.endpoint.api_key) from None
        return parse_completion(body)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.close()


#: Batch states after which nothing more will happen.
BATCH_FINAL = frozenset({"completed", "failed", "expired", "cancelled"})


class BatchClient:
    """The OpenAI Batch API: upload a JSONL of chat requests, create a batch, poll it, download results.

    These are a handful of control calls per run, so the client's own retries (which honour
    ``Retry-After``) are left on; the answers themselves are checked by :func:`parse_completion`.
    """

    def __init__(self, endpoint: Endpoint, *, timeout_s: float = 60.0, max_retries: int = 3):
        import openai

        _require_key(endpoint)
        self.endpoint = endpoint
        self._client = openai.OpenAI(base_url=endpoint.base_url, api_key=endpoint.api_key,
                                     max_retries=max_retries, timeout=timeout_s)

    def __repr__(self) -> str:
        return f"BatchClient({self.endpoint!r})"

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = classify(exc, self.endpoint.api_key)
            raise DimkitError(f"Batch API: {what} failed at {self.endpoint.public_url} ({err})") from None

    def check(self, timeout_s: float = 10.0) -> None:
        """Fail fast (DimkitError) if the endpoint is unreachable or rejects the key."""
        try:
            self._client.with_options(timeout=timeout_s).models.list()
        except Exception as exc:
            _raise_check_error(exc, self.endpoint)

    def submit(self, lines: list[dict], metadata: dict | None = None) -> dict:
        """Upload the request lines and create a batch; returns ``{"batch_id", "input_file_id"}``."""
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        f = self._call("upload", self._client.files.create,
                       file=("dimkit-batch.jsonl", data, "application/jsonl"), purpose="batch")
        b = self._call("create", self._client.batches.create, input_file_id=f.id,
                       endpoint="/v1/chat/completions", completion_window="24h", metadata=metadata)
        return {"batch_id": b.id, "input_file_id": f.id}

    def status(self, batch_id: str) -> dict:
        """``{"status", "output_file_id", "error_file_id", "request_counts"}`` of a batch."""
        b = self._call("poll", self._client.batches.retrieve, batch_id)
        counts = getattr(b, "request_counts", None)
        return {"status": b.status, "output_file_id": getattr(b, "output_file_id", None),
                "error_file_id": getattr(b, "error_file_id", None),
                "request_counts": counts.model_dump() if hasattr(counts, "model_dump") else counts}

    def download(self, file_id: str) -> str:
        """The text of a result file."""
        return self._call("download", self._client.files.content, file_id).text


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
