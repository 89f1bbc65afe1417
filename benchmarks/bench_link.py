"""Benchmark: link one new mention against a 110K-entity knowledge base on CPU.

Measured separately, because they cost very different things:

1. **Whole-KB scoring, once the run is loaded** -- what ``dimkit.link.Linker`` does after the
   mention's inputs exist: the ``paper`` model's forward pass for one mention (512-d, 8 heads),
   cosine scores against 109,976 stored entity vectors (normalised once, at load), top-10, and the
   result table (qid, name, description, score). Many single-mention calls; median and p95.
   Beside it, on the same tensors, the naive way: normalise the entity matrix on every call and sort
   all scores (what a per-call use of ``evaluate.kb_ranks``-style code would do).
2. **Encoding the new input** -- CLIP ViT-B/32 (the architecture DIM uses; random weights here, so
   the speed is real but the vectors mean nothing) on the mention, "mention [SEP] sentence" and the
   image, at batch 1, as ``link`` does for a mention nothing is stored for. The expert cue (BLIP-2)
   is not timed: it needs the real model; a stored cue costs one SQLite lookup.

Random features and weights: the numbers measure speed only. Results also go to
``$DIMKIT_RUNS/bench/bench_link.json``. ``--quick`` runs a small smoke version.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pandas as pd
import torch

from dimkit import paths
from dimkit.link import Linker
from dimkit.model import ModelConfig, build_model


def _percentiles(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1000
    return float(np.median(a)), float(np.percentile(a, 95))


def _time(fn, n: int, warmup: int = 5) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_scoring(n_entities: int, dim: int, calls: int, k: int, seed: int = 0) -> dict:
    """Single-mention scoring through the Linker vs the naive per-call normalise + full sort."""
    rng = np.random.default_rng(seed)
    entities = (rng.standard_normal((n_entities, dim), dtype=np.float32) * 0.3)      # raw, not unit length
    kb = pd.DataFrame({"qid": [f"Q{i}" for i in range(n_entities)],
                       "name": [f"entity {i % 40000}" for i in range(n_entities)],
                       "description": [f"description of entity {i}" for i in range(n_entities)]})
    torch.manual_seed(seed)
    model = build_model(ModelConfig(variant="paper", dim=dim, hidden=dim, heads=8))
    t0 = time.perf_counter()
    linker = Linker.from_parts(model, entities, kb, device="cpu")
    load_s = time.perf_counter() - t0
    feats = {name: rng.standard_normal((1, dim), dtype=np.float32) for name in
             ("mention", "mention_sentence", "image", "cue")}
    feats["image_ok"] = np.ones(1, bool)
    feats["cue_ok"] = np.ones(1, bool)

    full = _time(lambda: linker.rank_features(feats, k=k), calls)
    q = linker.query(feats)
    forward = _time(lambda: linker.query(feats), calls)
    score_topk = _time(lambda: linker.top_k(q, k), calls)

    raw = torch.as_tensor(entities)

    def naive():
        with torch.inference_mode():
            en = torch.nn.functional.normalize(raw, dim=-1)                              # [E, D] every call
            s = en @ torch.nn.functional.normalize(q.float(), dim=-1)[0]                 # [E]
            idx = torch.argsort(s, descending=True)[:k]
        return kb.iloc[idx.numpy()]

    naive_t = _time(naive, max(10, calls // 5), warmup=2)
    # The two must agree on the answer.
    assert list(naive()["qid"]) == list(linker.rank_features(feats, k=k)[0]["qid"])
    med, p95 = _percentiles(full)
    nmed, np95 = _percentiles(naive_t)
    return {"entities": n_entities, "dim": dim, "k": k, "calls": calls, "load_s": round(load_s, 3),
            "entity_matrix_mb": round(entities.nbytes / 2**20, 1),
            "link_ms_median": round(med, 2), "link_ms_p95": round(p95, 2),
            "forward_ms_median": round(_percentiles(forward)[0], 3),
            "score_topk_ms_median": round(_percentiles(score_topk)[0], 2),
            "naive_ms_median": round(nmed, 2), "naive_ms_p95": round(np95, 2),
            "speedup_median": round(nmed / med, 2)}


def bench_encoding(calls: int) -> dict:
    """CLIP ViT-B/32 (random weights) on one new mention: two texts and one image, batch 1."""
    from PIL import Image

    from dimkit.clip import load_clip

    t0 = time.perf_counter()
    cm = load_clip("ViT-B-32:random", device="cpu", precision="fp32")
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (320, 480, 3), dtype=np.uint8))
    texts = ["Barack Obama", "Barack Obama [SEP] Obama met Merkel in Berlin on Tuesday ."]
    t_text = _time(lambda: cm.encode_texts(texts), calls, warmup=2)
    t_img = _time(lambda: cm.encode_images([img]), calls, warmup=2)
    tm, tp = _percentiles(t_text)
    im, ip = _percentiles(t_img)
    return {"clip": cm.model_id, "weights": "random (speed only)", "load_s": round(load_s, 2), "calls": calls,
            "texts2_ms_median": round(tm, 1), "texts2_ms_p95": round(tp, 1),
            "image_ms_median": round(im, 1), "image_ms_p95": round(ip, 1),
            "encode_ms_median_total": round(tm + im, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entities", type=int, default=109_976, help="KB size (WikiMEL: 109,976)")
    ap.add_argument("--calls", type=int, default=300, help="single-mention calls timed")
    ap.add_argument("--encode-calls", type=int, default=20, help="CLIP encodings timed")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-encode", action="store_true", help="skip the CLIP encoding part")
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    args = ap.parse_args()
    if args.quick:
        args.entities, args.calls, args.encode_calls = 10_000, 30, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    print(f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_count']} CPUs "
          "(random features and weights: speed only)")

    s = bench_scoring(args.entities, 512, args.calls, args.k)
    print(f"\n1. whole-KB scoring of one mention, {s['entities']:,} entities x {s['dim']} "
          f"({s['entity_matrix_mb']} MB), top-{s['k']}, {s['calls']} calls, run loaded in {s['load_s']} s")
    print(f"   dimkit Linker (forward + scores + top-k + table): median {s['link_ms_median']:.2f} ms, "
          f"p95 {s['link_ms_p95']:.2f} ms  [target < 100 ms]")
    print(f"     of which model forward {s['forward_ms_median']:.3f} ms, "
          f"scores + top-k {s['score_topk_ms_median']:.2f} ms")
    print(f"   naive (normalise KB per call + full sort):       median {s['naive_ms_median']:.2f} ms, "
          f"p95 {s['naive_ms_p95']:.2f} ms")
    print(f"   ratio naive / dimkit (median): {s['speedup_median']:.1f}x")
    out = {"environment": env, "scoring": s}
    if not args.no_encode:
        e = bench_encoding(args.encode_calls)
        print(f"\n2. encoding the new input with CLIP {e['clip']} ({e['weights']}), batch 1, {e['calls']} calls "
              f"(model built in {e['load_s']} s)")
        print(f"   mention + 'mention [SEP] sentence': median {e['texts2_ms_median']} ms, p95 {e['texts2_ms_p95']} ms")
        print(f"   image:                              median {e['image_ms_median']} ms, p95 {e['image_ms_p95']} ms")
        print(f"   total per new mention (no stored vectors, cue stored): ~{e['encode_ms_median_total']} ms")
        out["encoding"] = e
    target = paths.runs_dir() / "bench" / "bench_link.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
