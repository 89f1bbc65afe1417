"""Rehearse a full reproduction on a synthetic dataset of a real one's shape, and see what each stage
costs as the data grows (``make rehearsal LIKE=wikimel``).

At each scale (default 1/16, 1/4 and full size) it builds a ``--like`` dataset with
``dimkit_dev.like`` (the real split and KB sizes, one image per mention, a realistic share broken)
and runs the whole chain, each stage as its own ``dimkit`` command, the code a real reproduction
runs: prepare, image check, candidates over the whole KB, augmentation against the local
OpenAI-compatible test server (``tests/llm_server.py``) with a realistic latency, expert cues with a
tiny random BLIP-2 built from a config, CLIP features with a tiny random CLIP of ViT-B/32's output size
(``dimkit-tiny-512``: the stores and matrices are as large as a real run's), a few
epochs of both variants with both evaluation protocols, tables, Figure 2, and ``dimkit link`` on a
batch of test mentions. It then runs the whole chain again (a rerun must redo nothing).

Printed per stage and scale: wall time, peak memory of the stage's process, items per second and
bytes stored; the exponent of time against size (mentions + entities) between the two largest
scales (candidates also against mentions x names, training against mentions x entities, for its
whole-KB evaluation); the rerun's time, and how much of it goes beyond what a rerun at the smallest
scale takes (process start-ups, imports); at the full size, the candidate lists beside DIM's
fuzzywuzzy loop on a sample of mentions. ``--kill`` adds a pass at the smallest scale that kills every stage with SIGKILL
halfway, reruns it, and checks the tables come out the same. Results go to
``<work>/rehearsal-<like>.{json,md,png,pdf}``.

On a GPU, the real architectures with random weights:
``--device cuda --clip ViT-B-32:random --blip2 opt-2.7b``.
Random weights and synthetic data: the numbers measure cost, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEY = "rehearsal-key"
NAME = "rehearsal"
LIMIT_GB = 4.0


def _du(*folders: Path) -> int:
    return sum(p.stat().st_size for f in folders if f.exists() for p in f.rglob("*")
               if p.is_file() and not p.is_symlink())


def _rate(per_s: float | None) -> str:
    """Items per second, with two decimals below 10 (BLIP-2 OPT-2.7b on a CPU does well under one image a second)."""
    per_s = per_s or 0.0
    return f"{per_s:.0f}" if per_s >= 10 else f"{per_s:.2f}"


class Chain:
    """One scale's folders and environment, and the stages run in it."""

    def __init__(self, work: Path, like: str, scale: float, args: argparse.Namespace, server_url: str, blip2: Path):
        self.work, self.like, self.scale, self.args = work, like, scale, args
        self.src = work / "source"
        self.env = dict(os.environ, DIMKIT_DATA=str(work / "data"), DIMKIT_CACHE=str(work / "cache"),
                        DIMKIT_RUNS=str(work / "runs"), DIMKIT_FIGURES=str(work / "figures"),
                        OPENAI_BASE_URL=server_url, OPENAI_API_KEY=KEY, HF_HUB_OFFLINE="1",
                        TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
        self.blip2 = blip2
        self.sizes: dict = {}

    def stages(self) -> list[tuple[str, list[str], str]]:
        """(stage, command, what its items are) in chain order."""
        dk = [sys.executable, "-m", "dimkit.cli"]
        epochs = str(self.args.epochs)
        device = ["--device", self.args.device]
        clip = ["--clip", self.args.clip] + device
        plus = f"{NAME}+"
        link_in = self.work / "link.jsonl"
        return [
            ("prepare", dk + ["prepare", str(self.src), "--name", NAME], "mentions"),
            ("images", dk + ["images", NAME], "images"),
            ("candidates", dk + ["candidates", NAME, "--k", "100"], "mentions"),
            ("augment", dk + ["augment", NAME, "--model", "fake-model", "--concurrency",
                              str(self.args.concurrency)], "entities"),
            ("cues", dk + ["cues", plus, "--expert", f"blip2:{self.blip2}", "--batch-size", "32"] + device, "images"),
            ("features", dk + ["features", plus] + clip, "texts+images"),
            ("train paper", dk + ["train", plus, "--epochs", epochs] + clip, "mention-epochs"),
            ("train released", dk + ["train", plus, "--variant", "released", "--epochs", epochs] + clip,
             "mention-epochs"),
            ("tables", dk + ["tables", "--dataset", NAME], "runs"),
            ("figure", dk + ["figure2", "--datasets", plus], "entities"),
            ("link", dk + ["link", "LATEST", "--input", str(link_in), "--output", str(self.work / "linked.jsonl")]
             + device, "mentions"),
        ]

    def items(self, stage: str) -> int:
        s = self.sizes
        return {"prepare": s["mentions"], "images": s["mentions"], "candidates": s["mentions"],
                "augment": s["entities"], "cues": s["mentions"], "features": s["texts"] + s["mentions"],
                "train paper": s["train"] * self.args.epochs, "train released": s["train"] * self.args.epochs,
                "tables": 2, "figure": s["entities"], "link": s["link"]}[stage]

    def run(self, stage: str, cmd: list[str], kill_after: float | None = None) -> dict:
        """Run one stage as its own process: wall time, peak memory, bytes stored."""
        if stage == "link":
            cmd = [c if c != "LATEST" else str(self.latest_run()) for c in cmd]
        folders = [self.work / d for d in ("data", "cache", "runs", "figures")]
        before = _du(*folders)
        log = open(self.work / f"{stage.replace(' ', '_')}.log", "a")
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.work)
        killed = False
        deadline = None if kill_after is None else t0 + kill_after
        while True:  # wait4 reaps the process and gives its peak memory; a stage may end before its kill
            pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
            if pid:
                break
            if time.perf_counter() >= deadline:
                os.kill(proc.pid, signal.SIGKILL)
                killed, deadline = True, None
            else:
                time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        wall = time.perf_counter() - t0
        log.close()
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and not killed:
            tail = (self.work / f"{stage.replace(' ', '_')}.log").read_text()[-3000:]
            raise RuntimeError(f"stage {stage} failed ({code}) at scale {self.scale}:\n{tail}")
        return {"stage": stage, "seconds": wall, "peak_mb": usage.ru_maxrss / 1024, "killed": killed,
                "bytes": _du(*folders) - before}

    def latest_run(self) -> Path:
        runs = sorted((self.work / "runs").glob(f"{NAME}+-paper-full-*/metrics.json"), key=lambda p: p.stat().st_mtime)
        return runs[-1].parent

    def prepare_inputs(self) -> None:
        """The synthetic source (not timed as a stage) and the link batch."""
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dimkit_dev.like", "--like", self.like, "--scale", str(self.scale),
                        "--out", str(self.src)], check=True, env=self.env, stdout=subprocess.DEVNULL)
        self.build_seconds = time.perf_counter() - t0
        report = json.loads((self.work / "source.like.json").read_text())
        m = report["mentions"]
        self.sizes = {"mentions": sum(m.values()), "train": m["train"], "entities": report["entities"]}
        # texts CLIP encodes: mention, mention+sentence, cue per mention; description and original per entity
        self.sizes["texts"] = 3 * self.sizes["mentions"] + 2 * self.sizes["entities"]
        test = json.loads((self.src / "wikipedia" / "test.json").read_text())
        lines = []
        for key, rec in list(test.items())[: self.args.link]:
            lines.append({"id": key, "sentence": rec["sentence"], "mention": rec["mentions"],
                          "image": str(self.src / "ImgData" / rec["imgPath"])})
        (self.work / "link.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        self.sizes["link"] = len(lines)


def start_server(latency: float) -> tuple[subprocess.Popen, str]:
    """The fake endpoint in its own process (as a remote one would be)."""
    # its stderr would fill the log with the resets of keep-alive connections a finished stage leaves
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "llm_server.py"), "--latency", str(latency),
                             "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError("fake LLM server did not start")
    return proc, url


def save_blip2(folder: Path, preset: str) -> Path:
    """A random BLIP-2 of a preset shape (``tiny``; ``opt-2.7b`` is DIM's, for a GPU) saved as a local
    checkpoint folder, the path a real one takes.

    Built in a child process: this one stays small, so the peak memory each stage's process reports
    (which starts as a fork of this one) is the stage's own.
    """
    if not (folder / "config.json").exists():
        code = ("import sys, torch; from dimkit_dev.tiny_blip2 import random_blip2; "
                "m, p = random_blip2(sys.argv[2], seed=0, dtype=torch.float16 if sys.argv[2] == 'opt-2.7b' else None); "
                "m.save_pretrained(sys.argv[1]); p.save_pretrained(sys.argv[1])")
        subprocess.run([sys.executable, "-c", code, str(folder), preset], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return folder


def fuzzywuzzy_side_by_side(chain: Chain, n: int, seconds_dimkit: float) -> dict | None:
    """DIM's loop (``process.extract`` per mention over every name) on ``n`` mentions, extrapolated."""
    try:
        from fuzzywuzzy import process
    except ImportError:
        return None
    import pandas as pd

    root = chain.work / "data" / NAME
    names = pd.read_parquet(root / "entities.parquet")["name"].astype(str).tolist()
    mentions = pd.unique(pd.read_parquet(root / "mentions.parquet")["mention"].astype(str))
    t0 = time.perf_counter()
    for m in mentions[:n]:
        process.extract(m, names, limit=100)
    per = (time.perf_counter() - t0) / min(n, len(mentions))
    loop = per * len(mentions)
    return {"sample": min(n, len(mentions)), "distinct_mentions": len(mentions), "names": len(names),
            "loop_seconds_extrapolated": loop, "dimkit_seconds": seconds_dimkit, "ratio": loop / seconds_dimkit}


def _tables_text(work: Path) -> dict[str, str]:
    """The rehearsal dataset's tables (both protocols), without the run column: what a rerun must keep."""
    import pandas as pd

    out = {}
    for p in sorted((work / "figures" / "tables").glob(f"{NAME}_*.csv")):
        df = pd.read_csv(p)
        out[p.name] = df.drop(columns=[c for c in ("run", "runs matched") if c in df]).to_csv(index=False)
    if not out or not any(NAME in text for text in out.values()):
        raise RuntimeError(f"no table of the rehearsal's runs in {work / 'figures' / 'tables'}")
    return out


def run_scale(args, like: str, scale: float, url: str, blip2: Path, kill: bool = False) -> dict:
    work = args.work / f"{like}-{scale:g}{'-kill' if kill else ''}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    chain = Chain(work, like, scale, args, url, blip2)
    chain.prepare_inputs()
    print(f"\n== {like} x{scale:g}: {chain.sizes['mentions']:,} mentions, {chain.sizes['entities']:,} entities "
          f"(source built in {chain.build_seconds:.1f} s)", flush=True)
    rows = []
    for stage, cmd, unit in chain.stages():
        if kill:
            first = chain.run(stage, cmd, kill_after=args.kill_after.get(stage, 5.0) / 2)
            again = chain.run(stage, cmd)
            rows.append({**again, "killed_first": first["killed"]})
            print(f"   {stage:<15} killed {first['killed']!s:5}  rerun {again['seconds']:8.1f} s", flush=True)
            continue
        r = chain.run(stage, cmd)
        r.update(items=chain.items(stage), unit=unit)
        r["items_per_s"] = r["items"] / r["seconds"] if r["seconds"] > 0 else None
        rows.append(r)
        print(f"   {stage:<15} {r['seconds']:8.1f} s  {r['peak_mb']:8.0f} MB  {_rate(r['items_per_s']):>10} {unit}/s"
              f"  {r['bytes'] / 1e6:9.1f} MB stored", flush=True)
    out = {"like": like, "scale": scale, "sizes": chain.sizes, "build_seconds": chain.build_seconds, "stages": rows,
           "tables": _tables_text(work)}
    if not kill:
        rerun = [chain.run(stage, cmd) for stage, cmd, _ in chain.stages()]
        out["rerun_seconds"] = sum(r["seconds"] for r in rerun)
        out["rerun_stages"] = {r["stage"]: r["seconds"] for r in rerun}
        out["tables_after_rerun_equal"] = _tables_text(work) == out["tables"]
        print(f"   rerun of the whole chain: {out['rerun_seconds']:.1f} s; tables unchanged: "
              f"{out['tables_after_rerun_equal']}", flush=True)
        if scale == max(args.scales) and args.fuzzy:
            cand = next(r for r in rows if r["stage"] == "candidates")
            out["fuzzywuzzy"] = fuzzywuzzy_side_by_side(chain, args.fuzzy, cand["seconds"])
    return out


def exponents(results: list[dict]) -> dict[str, dict]:
    """Fitted exponent of each stage's time against size, between the two largest scales."""
    if len(results) < 2:
        return {}
    a, b = sorted(results, key=lambda r: r["scale"])[-2:]
    size = lambda r: r["sizes"]["mentions"] + r["sizes"]["entities"]  # noqa: E731
    product = lambda r: r["sizes"]["mentions"] * r["sizes"]["entities"]  # noqa: E731
    out = {}
    for ra, rb in zip(a["stages"], b["stages"]):
        if ra["seconds"] <= 0 or rb["seconds"] <= 0:
            continue
        e = math.log(rb["seconds"] / ra["seconds"]) / math.log(size(b) / size(a))
        out[ra["stage"]] = {"size": round(e, 3)}
        # candidates compare every mention with every name, and training's whole-KB evaluation scores
        # every dev and test mention against every entity: their work grows as the product
        if ra["stage"] == "candidates" or ra["stage"].startswith("train"):
            key = "mentions_x_names" if ra["stage"] == "candidates" else "mentions_x_entities"
            out[ra["stage"]][key] = round(
                math.log(rb["seconds"] / ra["seconds"]) / math.log(product(b) / product(a)), 3)
    return out


def write_report(args, results: list[dict], kill: dict | None) -> Path:
    like = args.like
    exps = exponents(results)
    full = max(results, key=lambda r: r["scale"])
    lines = [f"# Rehearsal: {like}-shaped synthetic data", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
             f"random CLIP {args.clip} and BLIP-2 {args.blip2} (cost, not accuracy) on {args.device}; "
             f"LLM latency {args.latency} s, "
             f"concurrency {args.concurrency}; {args.epochs} epochs per variant.", ""]
    for r in results:
        s = r["sizes"]
        lines += [f"## x{r['scale']:g}: {s['mentions']:,} mentions, {s['entities']:,} entities", "",
                  "| stage | wall s | peak MB | items/s | stored MB | exponent |", "|---|---:|---:|---:|---:|---:|"]
        for st in r["stages"]:
            e = exps.get(st["stage"], {}) if r is full else {}
            ex = ", ".join(f"{v:.2f}" + ("" if k == "size" else f" ({k.replace('_', ' ')})") for k, v in e.items())
            lines.append(f"| {st['stage']} | {st['seconds']:.1f} | {st['peak_mb']:.0f} | "
                         f"{_rate(st.get('items_per_s'))} {st.get('unit', '')} | {st['bytes'] / 1e6:.1f} | {ex} |")
        lines += ["", f"Whole chain {sum(st['seconds'] for st in r['stages']):.1f} s; rerun {r['rerun_seconds']:.1f} s; "
                  f"tables unchanged by the rerun: {r['tables_after_rerun_equal']}.", ""]
    first = sum(st["seconds"] for st in full["stages"])
    # what a rerun cannot avoid (starting each stage's process, importing torch, reading the stores'
    # indexes) is about what the rerun at the smallest scale takes; beyond that is repeated work
    smallest = min(results, key=lambda r: r["scale"])
    beyond = max(0.0, full["rerun_seconds"] - smallest["rerun_seconds"])
    peak = max(st["peak_mb"] for st in full["stages"])
    worst = max(((k, v["size"]) for k, v in exps.items() if k != "candidates"), key=lambda kv: kv[1], default=None)
    scales = sorted(r["scale"] for r in results)
    lines += ["## Targets", "",
              f"- exponents (time vs mentions + entities, x{scales[-2]:g} to x{full['scale']:g}): worst "
              f"{worst[0] if worst else '-'} {worst[1] if worst else '-'} (target <= 1.15); "
              f"candidates {exps.get('candidates', {})}" if len(scales) > 1 else
              "- exponents: not fitted (one scale; pass two or more to --scales)",
              f"- peak memory of any stage at x{full['scale']:g}: {peak / 1024:.2f} GB (target <= {LIMIT_GB} GB)",
              f"- rerun of the whole chain at x{full['scale']:g}: {full['rerun_seconds']:.1f} s, of which "
              f"{beyond:.1f} s beyond the start-ups (the rerun at x{smallest['scale']:g}: "
              f"{smallest['rerun_seconds']:.1f} s) = {100 * beyond / first:.1f}% of the first run (target <= 5%)"
              if len(scales) > 1 else
              f"- rerun of the whole chain: {full['rerun_seconds']:.1f} s = {100 * full['rerun_seconds'] / first:.1f}% "
              f"of the first run, start-ups included (one scale: they cannot be told apart)"]
    fw = full.get("fuzzywuzzy")
    if fw:
        lines.append(f"- candidates over {fw['names']:,} names: dimkit {fw['dimkit_seconds']:.0f} s vs DIM's fuzzywuzzy "
                     f"loop {fw['loop_seconds_extrapolated']:.0f} s (extrapolated from {fw['sample']} of "
                     f"{fw['distinct_mentions']:,} mentions) -> {fw['ratio']:.0f}x (target >= 100x)")
    if kill is not None:
        same = kill["tables"] == min(results, key=lambda r: r["scale"])["tables"]
        ended = [st["stage"] for st in kill["stages"] if not st["killed_first"]]
        lines.append(f"- kill -9 halfway through every stage at x{kill['scale']:g}, then a rerun: tables identical "
                     f"to an uninterrupted run: {same}"
                     + (f" (ended before its kill, so not interrupted: {', '.join(ended)})" if ended else ""))
    report = args.work / f"rehearsal-{like}.md"
    report.write_text("\n".join(lines) + "\n")
    (args.work / f"rehearsal-{like}.json").write_text(json.dumps(
        {"results": results, "exponents": exps, "kill": kill}, indent=1, default=str))
    plot(args, results)
    return report


def plot(args, results: list[dict]) -> None:
    """Stage time against size, log-log, one line per stage (PNG and PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = sorted(results, key=lambda r: r["scale"])
    sizes = [r["sizes"]["mentions"] + r["sizes"]["entities"] for r in results]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, st in enumerate(results[0]["stages"]):  # tab20: eleven stages, eleven colours
        ax.loglog(sizes, [r["stages"][i]["seconds"] for r in results], marker="os^D"[i % 4],
                  color=plt.cm.tab20(i), label=st["stage"])
    ax.loglog(sizes, [sizes[0] and results[0]["stages"][0]["seconds"] * s / sizes[0] for s in sizes], "k:",
              label="linear (prepare's slope 1)")
    ax.set(xlabel="mentions + entities", ylabel="wall time (s)",
           title=f"Rehearsal on {args.like}-shaped synthetic data\n"
                 f"(random CLIP {args.clip}, random BLIP-2 {args.blip2}, {args.device})")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(args.work / f"rehearsal-{args.like}.{ext}", dpi=150)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    p.add_argument("--like", default="wikimel", choices=("wikimel", "richpediamel", "wikidiverse"))
    p.add_argument("--scales", default="0.0625,0.25,1", help="comma-separated fractions of the real size")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "rehearsal")
    p.add_argument("--latency", type=float, default=0.3, help="seconds per LLM answer (fake server)")
    p.add_argument("--concurrency", type=int, default=64, help="LLM requests in flight")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per variant")
    p.add_argument("--device", default="auto", help="device of cues, features, training and linking (cuda on a GPU)")
    p.add_argument("--blip2", default="tiny", choices=("tiny", "small", "opt-2.7b"),
                   help="shape of the random BLIP-2 expert (opt-2.7b: DIM's, 3.8 B parameters, for a GPU)")
    p.add_argument("--clip", default="dimkit-tiny-512:random",
                   help="feature model: a tiny random CLIP with ViT-B/32's 512-d output, so stores and "
                        "matrices have their real size (ViT-B-32:random for the real architecture: hours on a CPU)")
    p.add_argument("--link", type=int, default=200, help="test mentions linked in one batch")
    p.add_argument("--fuzzy", type=int, default=20, help="mentions timed with DIM's fuzzywuzzy loop (0: skip)")
    p.add_argument("--kill", action="store_true", help="also kill -9 every stage halfway at the smallest scale")
    args = p.parse_args(argv)
    args.scales = sorted(float(s) for s in args.scales.split(","))
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    server, url = start_server(args.latency)
    try:
        blip2 = save_blip2(args.work / f"blip2-{args.blip2}", args.blip2)
        results = [run_scale(args, args.like, s, url, blip2) for s in args.scales]
        kill = None
        if args.kill:
            smallest = results[0]
            args.kill_after = {st["stage"]: st["seconds"] for st in smallest["stages"]}
            kill = run_scale(args, args.like, args.scales[0], url, blip2, kill=True)
    finally:
        server.terminate()
    report = write_report(args, results, kill)
    print("\n" + report.read_text())
    print(f"wrote {report} (+ .json, .png, .pdf)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
