"""A fake OpenAI-compatible endpoint on 127.0.0.1 for tests and benchmarks (stdlib only).

It answers ``POST /v1/chat/completions`` and ``GET /v1/models`` in the OpenAI JSON shape, plus the
Files and Batches endpoints the Batch API mode needs, and it can misbehave on purpose: latency,
a requests-per-second limit answered with 429 + ``Retry-After``, and scripted faults per request
(429, 500, a hang past the client's timeout, malformed JSON, empty content, a dropped connection,
401). Every chat request is recorded so a test can count what the client sent.

Use it in-process (``with FakeLLMServer(latency=0.05) as srv: srv.base_url``) or as a separate
process, which the benchmark does so the server does not share the client's interpreter::

    python tests/llm_server.py --latency 0.5 --rate-limit 50     # prints the base URL, serves
    curl http://127.0.0.1:PORT/_stats                            # counts by status
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import re
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

#: A fault decides what one chat request gets instead of a normal answer:
#: "429" / "429:<seconds>" (Retry-After), "500", "503", "timeout" (hang past the client's timeout),
#: "malformed" (broken JSON), "badshape" (JSON without choices), "empty" (empty content),
#: "close" (drop the connection), "401", "quota" (429 insufficient_quota: the account's credit is spent).
FaultFn = Callable[[str, int], "str | None"]
#: OpenAI's answer when the account's quota or credit is spent: a 429 that no wait cures.
QUOTA_ERROR = {"error": {"message": "You exceeded your current quota, please check your plan and billing details.",
                         "type": "insufficient_quota", "code": "insufficient_quota"}}


def user_prompt(body: dict) -> str:
    """The text of the last user message of a chat request ('' if none)."""
    for msg in reversed(body.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            content = msg.get("content")
            return content if isinstance(content, str) else json.dumps(content)
    return ""


def fake_answer(prompt: str) -> str:
    """The deterministic answer the server gives to a prompt."""
    return f"Fake LLM answer. Asked: {prompt}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # 32+ clients connect at once; the default backlog of 5 makes the kernel drop SYNs (1 s stalls).
    request_queue_size = 512
    fake: "FakeLLMServer"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real endpoints
    # Headers and body go out in separate writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms a response), which would dwarf the latencies the tests inject.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet: tests read the records instead
        pass

    # -- plumbing --------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes | str | dict, headers: dict | None = None,
              content_type: str = "application/json") -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
            self.close_connection = True

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorised(self) -> bool:
        fake = self.server.fake
        if fake.api_key is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {fake.api_key}":
            return True
        with fake._lock:
            fake.refused_keys += 1
        self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                   "code": "invalid_api_key"}})
        return False

    # -- routes ----------------------------------------------------------------------------------
    def do_GET(self) -> None:
        fake = self.server.fake
        path = self.path.split("?")[0]
        if path == "/_stats":
            self._send(200, fake.stats())
            return
        if not self._authorised():
            return
        if path.endswith("/models"):
            self._send(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in fake.models]})
            return
        m = re.search(r"/files/([^/]+)/content$", path)
        if m:
            content = fake.files.get(m.group(1))
            if content is None:
                self._send(404, {"error": {"message": "no such file"}})
            else:
                self._send(200, content, content_type="application/octet-stream")
            return
        m = re.search(r"/batches/([^/]+)$", path)
        if m:
            batch = fake.poll_batch(m.group(1))
            self._send(200 if batch else 404, batch or {"error": {"message": "no such batch"}})
            return
        self._send(404, {"error": {"message": f"unknown path {path}"}})

    def do_POST(self) -> None:
        fake = self.server.fake
        path = self.path.split("?")[0]
        raw = self._read_body()
        if path == "/_reset":
            fake.reset()
            self._send(200, {"ok": True})
            return
        if not self._authorised():
            return
        if path.endswith("/chat/completions"):
            self._chat(raw)
        elif fake.quota_spent and (path.endswith("/files") or path.endswith("/batches")):
            with fake._lock:
                fake.quota_refusals += 1
            self._send(429, QUOTA_ERROR)
        elif path.endswith("/files"):
            self._upload(raw)
        elif path.endswith("/batches"):
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                self._send(400, {"error": {"message": "bad json"}})
                return
            self._send(200, fake.create_batch(body))
        else:
            self._send(404, {"error": {"message": f"unknown path {path}"}})

    def _upload(self, raw: bytes) -> None:
        # multipart/form-data: pull out the part named "file" without the deprecated cgi module.
        ctype = self.headers.get("Content-Type", "")
        m = re.search(r"boundary=\"?([^\";]+)\"?", ctype)
        if not m:
            self._send(400, {"error": {"message": "expected multipart/form-data"}})
            return
        content = None
        for part in raw.split(b"--" + m.group(1).encode()):
            head, _, data = part.partition(b"\r\n\r\n")
            if b'name="file"' in head:
                content = data[:-2] if data.endswith(b"\r\n") else data
        if content is None:
            self._send(400, {"error": {"message": "no file part"}})
            return
        self._send(200, self.server.fake.add_file(content, purpose="batch"))

    def _chat(self, raw: bytes) -> None:
        fake = self.server.fake
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send(400, {"error": {"message": "request body is not JSON"}})
            return
        prompt = user_prompt(body)
        status, fault, retry_after = fake.admit(prompt)
        if status == 429:
            headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}
            if fake.send_retry_after_ms:
                headers["retry-after-ms"] = f"{retry_after * 1000:.0f}"
            self._send(429, {"error": {"message": "Rate limit reached", "type": "requests",
                                       "code": "rate_limit_exceeded"}}, headers)
            return
        if fault is None or not fault.startswith("429"):
            if fake.latency:
                time.sleep(fake.latency)
        if fault:
            if fault.startswith("429"):
                secs = fault.split(":", 1)[1] if ":" in fault else "1"
                self._send(429, {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}},
                           {"Retry-After": secs})
                return
            if fault in ("500", "502", "503"):
                self._send(int(fault), {"error": {"message": "The server had an error", "type": "server_error"}})
                return
            if fault == "quota":
                self._send(429, QUOTA_ERROR)
                return
            if fault == "401":
                self._send(401, {"error": {"message": "Incorrect API key provided"}})
                return
            if fault == "timeout":
                time.sleep(fake.hang_s)
                fault = None  # answers, too late: the client has given up
            elif fault == "close":
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass
                return
            elif fault == "malformed":
                self._send(200, '{"id": "chatcmpl-x", "choices": [{"message": {"content": "trunc')
                return
        content = "" if fault == "empty" else fake.answer_fn(prompt)
        if fault == "badshape":
            self._send(200, {"id": "chatcmpl-x", "object": "chat.completion", "result": content})
            return
        self._send(200, chat_response(body.get("model", "?"), prompt, content))


def chat_response(model: str, prompt: str, content: str) -> dict:
    """A chat.completion object in the OpenAI shape."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": max(1, len(prompt) // 4), "completion_tokens": max(1, len(content) // 4),
                  "total_tokens": max(1, len(prompt) // 4) + max(1, len(content) // 4)},
    }


class FakeLLMServer:
    """An OpenAI-compatible HTTP server on 127.0.0.1 (port 0) with injectable faults."""

    def __init__(self, *, latency: float = 0.0, rate_limit: float | None = None,
                 api_key: str | None = "test-key", faults: dict[str, list[str]] | FaultFn | None = None,
                 hang_s: float = 2.0, models: tuple[str, ...] = ("fake-model",),
                 send_retry_after_ms: bool = True, batch_delay_s: float = 0.2,
                 answer_fn: Callable[[str], str] = fake_answer, port: int = 0):
        self.latency = latency
        self.rate_limit = rate_limit        # admitted chat requests per sliding second
        self.api_key = api_key
        self.hang_s = hang_s
        self.models = list(models)
        self.send_retry_after_ms = send_retry_after_ms  # OpenAI sends it; plain servers send Retry-After only
        self.batch_delay_s = batch_delay_s
        self.quota_spent = False  # True: every upload and batch creation gets OpenAI's insufficient_quota 429
        self.quota_refusals = 0
        self.refused_keys = 0  # requests answered 401 for a wrong or missing key
        self.answer_fn = answer_fn
        self.set_faults(faults)
        self._port = port
        self._lock = threading.Lock()
        self._window: collections.deque[float] = collections.deque()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict] = {}
        self.reset()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- configuration -----------------------------------------------------------------------------
    def set_faults(self, faults: dict[str, list[str]] | FaultFn | None) -> None:
        """Faults by prompt substring (successive requests get successive faults) or a function."""
        if faults is None:
            self._fault_fn: FaultFn = lambda prompt, n: None
        elif callable(faults):
            self._fault_fn = faults
        else:
            plan = dict(faults)

            def fn(prompt: str, n: int) -> str | None:
                for needle, seq in plan.items():
                    if needle in prompt:
                        return seq[n] if n < len(seq) else None
                return None
            self._fault_fn = fn

    def reset(self) -> None:
        """Forget recorded requests."""
        with getattr(self, "_lock", threading.Lock()):
            self.records: list[dict] = []
            self._per_prompt: collections.Counter[str] = collections.Counter()

    # -- request accounting (called from handler threads) -------------------------------------------
    def admit(self, prompt: str) -> tuple[int, str | None, float]:
        """Decide one chat request's fate: (status, fault, retry_after)."""
        now = time.monotonic()
        with self._lock:
            n = self._per_prompt[prompt]
            self._per_prompt[prompt] += 1
            if self.rate_limit:
                while self._window and self._window[0] <= now - 1.0:
                    self._window.popleft()
                if len(self._window) >= self.rate_limit:
                    wait = self._window[0] + 1.0 - now
                    self.records.append({"t": now, "prompt": prompt, "status": 429, "fault": "rate"})
                    return 429, "rate", wait
                self._window.append(now)
            fault = self._fault_fn(prompt, n)
            status = {"429": 429, "quota": 429, "500": 500, "502": 502, "503": 503, "401": 401}.get(
                (fault or "").split(":")[0], 200)
            self.records.append({"t": now, "prompt": prompt, "status": status, "fault": fault})
            return 0, fault, 0.0

    def stats(self) -> dict:
        """Counts of chat requests by status and fault."""
        with self._lock:
            recs = list(self.records)
        by_status = collections.Counter(str(r["status"]) for r in recs)
        ok = [r["t"] for r in recs if r["status"] == 200]
        return {"requests": len(recs), "by_status": dict(by_status),
                "answered": by_status.get("200", 0),
                "first_ok": min(ok) if ok else None, "last_ok": max(ok) if ok else None,
                "batches": len(self.batches)}

    def chat_prompts(self) -> list[str]:
        """User prompts of every recorded chat request, in arrival order."""
        with self._lock:
            return [r["prompt"] for r in self.records]

    # -- batch API -----------------------------------------------------------------------------------
    def add_file(self, content: bytes, purpose: str) -> dict:
        """Keep an uploaded (or generated) file; returns its File object."""
        fid = f"file-{uuid.uuid4().hex[:16]}"
        self.files[fid] = content
        return {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": "input.jsonl", "purpose": purpose, "status": "processed"}

    def create_batch(self, body: dict) -> dict:
        """Register a batch; it completes ``batch_delay_s`` after creation, when next polled."""
        bid = f"batch_{uuid.uuid4().hex[:16]}"
        batch = {"id": bid, "object": "batch", "endpoint": body.get("endpoint"),
                 "input_file_id": body.get("input_file_id"),
                 "completion_window": body.get("completion_window", "24h"), "status": "validating",
                 "created_at": int(time.time()), "output_file_id": None, "error_file_id": None,
                 "errors": None, "metadata": body.get("metadata"),
                 "request_counts": {"total": 0, "completed": 0, "failed": 0}, "_t0": time.monotonic()}
        self.batches[bid] = batch
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def poll_batch(self, bid: str) -> dict | None:
        """The Batch object (None if unknown), completing it once its time has come."""
        batch = self.batches.get(bid)
        if batch is None:
            return None
        if batch["status"] != "completed" and time.monotonic() - batch["_t0"] >= self.batch_delay_s:
            self._complete_batch(batch)
        elif batch["status"] == "validating":
            batch["status"] = "in_progress"
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def _complete_batch(self, batch: dict) -> None:
        lines = self.files.get(batch["input_file_id"], b"").decode().splitlines()
        out, err = [], []
        for line in lines:
            if not line.strip():
                continue
            req = json.loads(line)
            prompt = user_prompt(req.get("body", {}))
            with self._lock:
                n = self._per_prompt[prompt]
                self._per_prompt[prompt] += 1
                fault = self._fault_fn(prompt, n)
                self.records.append({"t": time.monotonic(), "prompt": prompt, "status": 200,
                                     "fault": fault, "batch": batch["id"]})
            if fault in ("500", "503"):
                err.append({"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": req["custom_id"],
                            "response": None, "error": {"code": "server_error", "message": "failed"}})
                continue
            if fault == "quota":  # a request of the batch refused because the account's credit ran out
                out.append({"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": req["custom_id"],
                            "response": {"status_code": 429, "request_id": uuid.uuid4().hex, "body": QUOTA_ERROR},
                            "error": None})
                continue
            content = "" if fault == "empty" else self.answer_fn(prompt)
            out.append({"id": f"batch_req_{uuid.uuid4().hex[:8]}", "custom_id": req["custom_id"],
                        "response": {"status_code": 200, "request_id": uuid.uuid4().hex,
                                     "body": chat_response(req["body"].get("model", "?"), prompt, content)},
                        "error": None})
        if out:
            batch["output_file_id"] = self.add_file(
                "".join(json.dumps(o) + "\n" for o in out).encode(), "batch_output")["id"]
        if err:
            batch["error_file_id"] = self.add_file(
                "".join(json.dumps(o) + "\n" for o in err).encode(), "batch_output")["id"]
        batch["request_counts"] = {"total": len(out) + len(err), "completed": len(out), "failed": len(err)}
        batch["status"] = "completed"
        batch["completed_at"] = int(time.time())

    # -- lifecycle -------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1``: what OPENAI_BASE_URL should be."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeLLMServer":
        """Bind 127.0.0.1 and serve in a daemon thread."""
        self._httpd = _Server(("127.0.0.1", self._port), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve until killed; print the base URL on the first line of stdout."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", type=float, default=0.0, help="seconds per answered request")
    p.add_argument("--rate-limit", type=float, default=None, help="admitted requests per second")
    p.add_argument("--api-key", default="test-key")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args(argv)
    srv = FakeLLMServer(latency=args.latency, rate_limit=args.rate_limit, api_key=args.api_key,
                        port=args.port).start()
    print(srv.base_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
