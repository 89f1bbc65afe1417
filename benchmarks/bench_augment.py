"""Throughput of ``dimkit augment`` against a local OpenAI-compatible server.

Three measurements over the same synthetic KB (2,000 entities by default), each against a fresh
fake server running in its own process (as a remote endpoint would, so server and client do not
share an interpreter):

1. latency-bound: every answer takes 500 ms; concurrency 32 -> ideal 64 answers/s (target >= 90%).
   A sequential loop (concurrency 1) on a few entities is measured beside it: about 2/s.
2. rate-limited: the server admits 50 requests per sliding second and answers 429 + Retry-After
   beyond that -> target >= 85% of 50/s, every entity done, none failed.
3. a rerun over the same store sends 0 requests.

Run: ``.venv/bin/python benchmarks/bench_augment.py [--entities 2000] [--no-adaptive-rate]`` (the latter
without the request-rate cap learnt from 429s, to see what it earns). Prints a table and writes
``$DIMKIT_RUNS/bench/bench_augment.json``. Two throughputs are printed, both from the client's side:
"overall" = answers / live phase (endpoint check done -> last answer committed, ramp-up and the last
partial wave included); "sustained" = answers per second between the 10th and the 90th percentile
of commit times (the store's ``created`` stamps), the steady state the targets are about.
The host's load average is printed too: on a shared 2-core machine other jobs slow both processes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

KEY = "bench-key"


def start_server(latency: float, rate_limit: float | None) -> tuple[subprocess.Popen, str]:
    """The fake server in a child process; returns it and its base URL."""
    cmd = [sys.executable, str(REPO / "tests" / "llm_server.py"), "--latency", str(latency), "--api-key", KEY]
    if rate_limit:
        cmd += ["--rate-limit", str(rate_limit)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError("fake server did not start")
    return proc, url


def stats(url: str) -> dict:
    """The server's request counts (its /_stats route)."""
    with urllib.request.urlopen(url.rsplit("/v1", 1)[0] + "/_stats", timeout=10) as resp:
        return json.load(resp)


def make_kb(data_dir: Path, name: str, n: int) -> None:
    """A prepared dataset of ``n`` entities (one mention each, no images)."""
    import pandas as pd

    from dimkit import datasets

    ents = pd.DataFrame({"qid": [f"Q{1000 + i}" for i in range(n)],
                         "name": [f"Entity number {i}" for i in range(n)],
                         "description": [f"original description {i}" for i in range(n)],
                         "description_source": "bench", "images": [[] for _ in range(n)]})
    ments = pd.DataFrame({"mention_id": [f"m{i}" for i in range(n)], "split": "train",
                          "sentence": [f"A sentence about entity {i}." for i in range(n)],
                          "mention": [f"entity {i}" for i in range(n)], "image": None,
                          "qid": ents["qid"]})
    datasets.write_prepared(data_dir / name, ments, ents, {"layout": "bench"})


def run(name: str, url: str, store: Path, concurrency: int, **settings):
    """One ``augment`` run against ``url`` with its own store."""
    from dimkit import augment

    cfg = augment.AugmentConfig.for_dataset(name, out=f"{name}+", model="fake-model", concurrency=concurrency,
                                            progress=False, **settings)
    return augment.run(cfg, base_url=url, api_key=KEY, store=store)


def sustained_rate(store: Path, lo: float = 0.1, hi: float = 0.9) -> float:
    """Answers per second between the lo and hi quantiles of commit times in ``store``."""
    from dimkit.store import Store

    with Store(store) as s:
        t = sorted(r["created"] for r in s.items("llm_description"))
    i, j = int(lo * (len(t) - 1)), int(hi * (len(t) - 1))
    return (j - i) / (t[j] - t[i]) if j > i and t[j] > t[i] else float("nan")


def main() -> int:
    """Run the three measurements; exit 1 if a target is missed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--entities", type=int, default=2000)
    p.add_argument("--latency", type=float, default=0.5, help="server latency, latency-bound case (s)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rate-limit", type=float, default=50.0, help="requests/s, rate-limited case")
    p.add_argument("--rate-latency", type=float, default=0.2,
                   help="server latency in the rate-limited case (s): 32 workers could do 160/s unthrottled")
    p.add_argument("--sequential", type=int, default=10, help="entities for the sequential baseline")
    p.add_argument("--no-adaptive-rate", action="store_true",
                   help="without the request-rate cap learnt from 429s (to see what it earns)")
    args = p.parse_args()
    settings = {"adaptive_rate": not args.no_adaptive_rate}

    from dimkit import paths

    results_path = paths.runs_dir() / "bench" / "bench_augment.json"  # before the env points elsewhere
    tmp = Path(tempfile.mkdtemp(prefix="bench_augment_"))
    os.environ.update(DIMKIT_DATA=str(tmp / "data"), DIMKIT_CACHE=str(tmp / "cache"),
                      DIMKIT_RUNS=str(tmp / "runs"), TQDM_DISABLE="1")
    os.environ.pop("OPENAI_API_KEY", None)
    make_kb(tmp / "data", "kb", args.entities)
    make_kb(tmp / "data", "kbseq", args.sequential)
    load_before = os.getloadavg()[0]
    result: dict = {"entities": args.entities, "concurrency": args.concurrency, **settings,
                    "python": sys.version.split()[0], "cpus": os.cpu_count()}
    rows = []

    def row(case: str, rep, ideal: float | None, store: Path | None, sent: int | None = None) -> dict:
        r = {"case": case, "entities": rep.entities, "overall": rep.answers_per_s,
             "sustained": sustained_rate(store) if store is not None and rep.done else None,
             "ideal": ideal, "done": rep.done, "failed": rep.failed,
             "requests": rep.requests if sent is None else sent, "http_429": rep.rate_limited}
        rows.append(r)
        return r

    # 1. latency-bound, with the sequential loop beside it; 3. the rerun over the same store.
    proc, url = start_server(args.latency, None)
    try:
        seq = run("kbseq", url, tmp / "seq.sqlite", 1, **settings)
        seq_row = row(f"sequential, {args.latency * 1000:.0f} ms", seq, 1 / args.latency, None)
        lat = run("kb", url, tmp / "latency.sqlite", args.concurrency, **settings)
        result["latency_bound"] = row(f"latency-bound, {args.latency * 1000:.0f} ms x {args.concurrency}",
                                      lat, args.concurrency / args.latency, tmp / "latency.sqlite")
        before = stats(url)["requests"]
        again = run("kb", url, tmp / "latency.sqlite", args.concurrency, **settings)
        result["rerun"] = row("rerun (same store)", again, None, None, sent=stats(url)["requests"] - before)
    finally:
        proc.kill()
        proc.wait()

    # 2. rate-limited.
    proc, url = start_server(args.rate_latency, args.rate_limit)
    try:
        rl = run("kb", url, tmp / "ratelimited.sqlite", args.concurrency, **settings)
        result["rate_limited"] = row(f"rate-limited {args.rate_limit:.0f}/s, {args.rate_latency * 1000:.0f} ms"
                                     f" x {args.concurrency}", rl, args.rate_limit, tmp / "ratelimited.sqlite")
        result["rate_limited"]["server"] = stats(url)
    finally:
        proc.kill()
        proc.wait()
    result["load_average"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}

    def fmt(x: float | None, spec: str = ".1f") -> str:
        return "-" if x is None or x != x else format(x, spec)

    print(f"\n{'case':<36} {'overall/s':>9} {'sustained/s':>11} {'ideal/s':>7} {'ratio':>5} {'done':>5} "
          f"{'failed':>6} {'requests':>8} {'429s':>5}")
    for r in rows:
        ratio = r["sustained"] / r["ideal"] if r["sustained"] and r["ideal"] else (
            r["overall"] / r["ideal"] if r["overall"] and r["ideal"] else None)
        r["ratio"] = ratio
        print(f"{r['case']:<36} {fmt(r['overall']):>9} {fmt(r['sustained']):>11} {fmt(r['ideal'], '.0f'):>7} "
              f"{fmt(ratio, '.2f'):>5} {r['done']:>5} {r['failed']:>6} {r['requests']:>8} {r['http_429']:>5}")
    lb, rlr, rr = result["latency_bound"], result["rate_limited"], result["rerun"]
    checks = {
        "latency-bound: sustained >= 90% of ideal, none failed": lb["ratio"] >= 0.90 and lb["failed"] == 0,
        "rate-limited: sustained >= 85% of the limit, every entity done, none failed": (
            rlr["ratio"] >= 0.85 and rlr["failed"] == 0 and rlr["done"] == args.entities),
        "rerun over the same store sends 0 requests": rr["requests"] == 0,
    }
    print()
    for k, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {k}")
    print(f"concurrency {args.concurrency} vs the sequential loop: {lb['overall'] / seq_row['overall']:.1f}x; "
          f"load average {result['load_average']['before']} -> {result['load_average']['after']} "
          f"on {os.cpu_count()} CPUs")
    result["checks"] = checks
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"results: {results_path}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
