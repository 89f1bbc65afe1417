"""Benchmark: dimkit's candidate ranking against DIM's fuzzywuzzy ``process.extract`` loop.

DIM built ``search_top100.json`` with one ``fuzzywuzzy.process.extract(mention, names, limit=100)``
call per mention string. This script builds a synthetic KB of entity-like names and distinct
mention strings derived from them (exact, case changes, typos, partial names, re-ordered tokens,
accents and punctuation), times :func:`dimkit.candidates.rank_names` on all of them and the
fuzzywuzzy loop on a random subset (the loop takes minutes per thousand mentions at this size), and
extrapolates the loop per mention to the full set. It prints both timings, the ratio, recall@k of
the gold for both on the subset, and how often the two top-k lists agree.

Needs the ``bench`` extra (``pip install -e '.[bench]'``: fuzzywuzzy 0.18 and python-Levenshtein,
as DIM's environment had). Synthetic data, not the paper's datasets.

    python benchmarks/bench_candidates.py            # ~17K names x ~17K mentions
    python benchmarks/bench_candidates.py --quick    # smoke run, seconds
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import numpy as np

from dimkit.candidates import rank_names

_ONSETS = ["b", "br", "c", "ch", "d", "f", "g", "gr", "h", "j", "k", "l", "m", "n", "p", "r", "s",
           "st", "t", "th", "v", "w", "z"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "é", "ö", "ü", "á"]
_CODAS = ["", "", "n", "r", "s", "l", "m", "rt", "nd", "ck", "x", "th"]
_FIRST = ["John", "Mary", "James", "Anna", "George", "Maria", "William", "Elizabeth", "Charles",
          "Louis", "Henry", "Sophie", "Carlos", "José", "Ahmed", "Yuki", "Olga", "Pierre", "Hans",
          "Li", "Robert", "Thomas", "Margaret", "Peter", "Paul", "Catherine", "Frederick", "Ivan"]
_PATTERNS = [
    ("{F} {S}", 30), ("{F} {S} {S}", 6), ("{S}", 8), ("{S} {S}", 6), ("{F} {I}. {S}", 4),
    ("University of {S}", 3), ("{S} University", 2), ("{S} F.C.", 3), ("Battle of {S}", 3),
    ("{S} River", 3), ("Saint {S}", 2), ("{S} (album)", 2), ("{S} (band)", 2), ("{S} Airport", 2),
    ("Church of St. {S}", 1), ("{S}, {S}", 3), ("The {S} {S}", 3), ("{S} Station", 2),
    ("{S} II", 2), ("{S}-{S}", 3), ("{S} & {S}", 1),
]


def _word(rng: random.Random) -> str:
    syl = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
           for _ in range(rng.choice([1, 2, 2, 3]))]
    return "".join(syl).capitalize()


def make_names(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct entity-like names (DIM's choices are the distinct keys of ``ne2qid``)."""
    surnames = [_word(rng) for _ in range(max(50, n // 3))]  # shared tokens make near-duplicates
    patterns, weights = zip(*_PATTERNS)
    out: dict[str, None] = {}
    while len(out) < n:
        p = rng.choices(patterns, weights)[0]
        name = p.replace("{F}", rng.choice(_FIRST)).replace("{I}", rng.choice("ABCDEFGHJKLMRSTW"))
        while "{S}" in name:
            name = name.replace("{S}", rng.choice(surnames), 1)
        out[name] = None
    return list(out)


def _typo(s: str, rng: random.Random) -> str:
    chars = list(s)
    for _ in range(rng.choice([1, 1, 2])):
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.35:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
        elif op < 0.6 and len(chars) > 2:
            del chars[i]
        elif op < 0.8:
            chars.insert(i, rng.choice("abcdefghijklmnopqrstuvwxyz"))
        elif i + 1 < len(chars):
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def _mention(name: str, rng: random.Random) -> str:
    toks = name.split()
    r = rng.random()
    if r < 0.15:
        return name
    if r < 0.25:
        return rng.choice([name.lower(), name.upper()])
    if r < 0.45:
        return _typo(name, rng)
    if r < 0.65 and len(toks) > 1:
        return rng.choice([toks[-1], toks[0], " ".join(toks[1:]), " ".join(toks[:-1])])
    if r < 0.72 and len(toks) > 1:
        t = toks[:]
        rng.shuffle(t)
        return " ".join(t)
    if r < 0.8:
        return rng.choice(["the ", "", ""]) + name + rng.choice(["'s", ",", " (2010)", "!"])
    if r < 0.9 and len(toks) > 1:
        return _typo(rng.choice([toks[-1], " ".join(toks[1:])]), rng)
    return _typo(name.lower(), rng)


def make_mentions(names: list[str], n: int, rng: random.Random) -> tuple[list[str], list[int]]:
    """``n`` distinct mention strings and the index of the gold name of each."""
    seen: dict[str, int] = {}
    while len(seen) < n:
        g = rng.randrange(len(names))
        m = _mention(names[g], rng).strip()
        if m and m not in seen:
            seen[m] = g
    return list(seen), list(seen.values())


def main(argv: list[str] | None = None) -> int:
    """Build the synthetic KB, time both sides, print timings, ratio and agreement."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-names", type=int, default=17_000)
    ap.add_argument("--n-mentions", type=int, default=17_000)
    ap.add_argument("--baseline-sample", type=int, default=200,
                    help="mentions timed with the fuzzywuzzy loop (extrapolated to all)")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--workers", type=int, default=-1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with-full", action="store_true",
                    help="also time rank_names(strategy='full'), plain cdist WRatio on every pair")
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_names, args.n_mentions, args.baseline_sample = 2_000, 2_000, 20
        args.with_full = True
    try:
        import Levenshtein  # noqa: F401  (fuzzywuzzy falls back to difflib without it)
        from fuzzywuzzy import fuzz, process
    except ImportError:
        print("needs fuzzywuzzy and python-Levenshtein: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    import logging
    logging.getLogger().setLevel(logging.ERROR)  # fuzzywuzzy warns on queries that process to ""

    rng = random.Random(args.seed)
    names = make_names(args.n_names, rng)
    mentions, gold = make_mentions(names, args.n_mentions, rng)
    k = args.k
    print(f"synthetic KB: {len(names)} distinct names, {len(mentions)} distinct mention strings, "
          f"k={k}, seed={args.seed}, cpus={os.cpu_count()}")

    t0 = time.perf_counter()
    ranking = rank_names(mentions, names, k, workers=args.workers)
    t_dimkit = time.perf_counter() - t0
    hits = ranking.indices == np.asarray(gold)[:, None]
    print(f"dimkit rank_names (pruned WRatio, rapidfuzz, workers={args.workers}): {t_dimkit:.2f}s for all "
          f"{len(mentions)} mentions = {1e3 * t_dimkit / len(mentions):.3f} ms/mention; "
          f"recall@{k} {hits.any(axis=1).mean():.4f}")

    if args.with_full:
        t0 = time.perf_counter()
        plain = rank_names(mentions, names, k, workers=args.workers, strategy="full")
        t_full = time.perf_counter() - t0
        same = np.array_equal(plain.indices, ranking.indices) and np.array_equal(plain.scores, ranking.scores)
        print(f"dimkit rank_names(strategy='full') (cdist WRatio on every pair): {t_full:.2f}s = "
              f"{1e3 * t_full / len(mentions):.3f} ms/mention; pruned is {t_full / t_dimkit:.1f}x "
              f"faster; identical lists and scores: {same}")

    sample = sorted(random.Random(args.seed + 1).sample(range(len(mentions)),
                                                        min(args.baseline_sample, len(mentions))))
    t0 = time.perf_counter()
    fw_lists = [process.extract(mentions[i], names, limit=k) for i in sample]
    t_fw = time.perf_counter() - t0
    per_fw = t_fw / len(sample)
    est_fw = per_fw * len(mentions)
    print(f"fuzzywuzzy process.extract loop: {t_fw:.2f}s for a random subset of {len(sample)} "
          f"mentions = {1e3 * per_fw:.1f} ms/mention -> {est_fw:.0f}s extrapolated to "
          f"{len(mentions)} mentions")
    print(f"speed-up (extrapolated fuzzywuzzy / dimkit): {est_fw / t_dimkit:.1f}x")

    # Quality on the subset, both sides on the same mentions.
    pos = {n: i for i, n in enumerate(names)}
    same_set = valid = top1 = strong_kept = strong_n = 0
    overlap, both, fw_only, ours_only = [], [], [], []
    for row, scores, i, fw in zip(ranking.indices[sample], ranking.scores[sample], sample, fw_lists):
        fw_idx = [pos[n] for n, _ in fw]
        fw_scores = [s for _, s in fw]
        ours = row.tolist()
        in_fw, in_ours = gold[i] in fw_idx, gold[i] in ours
        (both if in_fw and in_ours else fw_only if in_fw else ours_only if in_ours else []).append(i)
        if in_fw != in_ours:  # explain: fuzzywuzzy's and rapidfuzz's score of the gold, and the cuts
            print(f"  gold only in {'fuzzywuzzy' if in_fw else 'dimkit'}'s list: mention {mentions[i]!r}, "
                  f"gold {names[gold[i]]!r}: fuzzywuzzy {fuzz.WRatio(mentions[i], names[gold[i]])} "
                  f"(its cut {fw_scores[-1]}), rapidfuzz "
                  f"{rank_names([mentions[i]], [names[gold[i]]], 1).scores[0, 0]:.1f} "
                  f"(its cut {scores[-1]:.1f})")
        overlap.append(len(set(fw_idx) & set(ours)) / len(fw_idx))
        same_set += set(fw_idx) == set(ours)
        # "Agree up to ties": scored by fuzzywuzzy itself, dimkit's list is also a valid top-k.
        ours_fw = sorted((fuzz.WRatio(mentions[i], names[j]) for j in ours), reverse=True)
        valid += ours_fw == fw_scores
        top1 += ours_fw[0] == fw_scores[0]
        if fw_scores[-1] < 85:  # every name fuzzywuzzy scores >= 85 made its list: no tie at the cut
            strong_n += 1
            strong_kept += {j for j, s in zip(fw_idx, fw_scores) if s >= 85} <= set(ours)
    n = len(sample)
    fw_hit, ours_hit = len(both) + len(fw_only), len(both) + len(ours_only)
    print(f"on the subset of {n}: recall@{k} fuzzywuzzy {fw_hit / n:.4f} ({fw_hit}/{n}), "
          f"dimkit {ours_hit / n:.4f} ({ours_hit}/{n}) -> "
          + ("equal" if fw_hit == ours_hit else f"DIFFERENT by {ours_hit - fw_hit:+d}")
          + f"; gold in both lists {len(both)}, only fuzzywuzzy's {len(fw_only)}, "
          f"only dimkit's {len(ours_only)}")
    print(f"  top-{k} lists agree up to ties (dimkit's list is a valid fuzzywuzzy top-{k}): "
          f"{valid}/{n}; identical sets {same_set}/{n}; mean overlap {np.mean(overlap):.3f}; "
          f"top-1 agrees up to ties {top1}/{n}; strong matches (fuzzywuzzy score >= 85) all in "
          f"dimkit's list {strong_kept}/{strong_n}")
    print("  (the lists differ among weak matches: fuzzywuzzy + python-Levenshtein scores "
          "partial_ratio with a matching-block heuristic, rapidfuzz with the best alignment)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
