"""Synthetic datasets with the shape of the real ones, to rehearse a reproduction at full size.

``build_like("wikimel", out)`` writes, in the DIM release layout that ``dimkit prepare`` reads
(``wikipedia/{train,dev,test}.json``, ``brief.json``, ``qids_ordered.json``, ``ne2qid.json`` and
``ImgData/wikipedia/<key>.<ext>``), a dataset with the split sizes and knowledge-base size of
WikiMEL, RichpediaMEL or WikiDiverse (MIMIC's cleaned versions), scaled by ``scale``:

- entity names drawn from first/last-name and organisation/place pools, so names repeat and
  mentions are ambiguous; descriptions of Wikipedia-brief length (15 to 80 words);
- one image per mention, 150 to 640 pixels a side, JPEG (about 70%) and PNG, with a realistic
  share broken: cut-off files, empty files, an HTML error page saved as an image, and files that
  are referenced but missing;
- no ``search_top100.json``: the rehearsal builds the candidate lists over the whole KB itself.

Every dataset uses the WikiMEL record layout (the three releases differ in layout, not in what the
rehearsal measures). Same arguments, same bytes; images are written by worker processes.
Nothing here is real data: names, texts and pictures are made up.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dimkit import atomic

#: Train / dev / test mentions and KB entities of the cleaned releases (MIMIC's splits).
SHAPES: dict[str, dict[str, int]] = {
    "wikimel": {"train": 18_092, "dev": 2_585, "test": 5_169, "kb": 109_976},
    "richpediamel": {"train": 12_463, "dev": 1_780, "test": 3_562, "kb": 160_933},
    "wikidiverse": {"train": 11_351, "dev": 1_664, "test": 2_078, "kb": 132_460},
}
#: Share of mention images that are unusable, by kind (the rest load).
BROKEN = {"truncated": 0.012, "empty": 0.004, "html": 0.004, "missing": 0.01}
_FIRST = ("Anna Boris Carla David Elena Farid Greta Hugo Ines Jonas Kira Luca Mara Nils Olga Pavel Quinn "
          "Rosa Sven Tara Ugo Vera Wim Xenia Yusuf Zora Ada Ben Clio Dario Eva Felix Gia Hana Ivo Jana").split()
_SYLLABLES = ("ka lo mi ran tes vel dor an bri co den fa gil har is jo kel lum mor nes ol pra qui ros sal "
              "tor ul ven wil xa yor zen").split()
_ORG = ("United Northern Royal Central Golden Eastern Coastal Free National Union Pacific Alpine Grand "
        "Old New Upper Lower Silver Iron Green").split()
_KIND = ("Club Records Press Institute Party Railway Bank Orchestra Council Museum Airlines Lab Guild "
         "Theatre Festival College Brewery Studio Mission Dynasty").split()
_ENDINGS = ("ville burg ford ton mere dale wick port field stead").split()
#: Share of entities that take the name of an earlier one: the ambiguity MEL is about.
NAMESAKES = 0.2
_WORDS = ("born served known founded member played elected released studied worked award national "
          "first league album season career founded team politician singer writer painter actor river "
          "city company school history century district province capital debut record title minister "
          "champion film series novel band station border region village church bridge university").split()


@dataclass
class LikeReport:
    """What :func:`build_like` wrote."""

    like: str
    scale: float
    out: str
    mentions: dict
    entities: int
    images: dict
    bytes: int
    seconds: float

    def summary(self) -> str:
        """A few readable lines."""
        m = self.mentions
        return (f"{self.like}-shaped sample x{self.scale:g} in {self.out}: mentions train {m['train']:,}, "
                f"dev {m['dev']:,}, test {m['test']:,}; {self.entities:,} entities; images "
                + ", ".join(f"{k} {v:,}" for k, v in self.images.items())
                + f"; {self.bytes / 1e6:,.1f} MB in {self.seconds:.1f} s")


def _name(rng: np.random.Generator, earlier: list[str]) -> str:
    """Persons (60%), organisations and places; a share repeats an earlier name (namesakes)."""
    if earlier and rng.random() < NAMESAKES:
        return earlier[int(rng.integers(len(earlier)))]
    stem = "".join(_SYLLABLES[j] for j in rng.integers(len(_SYLLABLES), size=int(rng.integers(2, 4)))).capitalize()
    r = rng.random()
    if r < 0.6:
        return f"{_FIRST[rng.integers(len(_FIRST))]} {stem}"
    if r < 0.85:
        return f"{_ORG[rng.integers(len(_ORG))]} {stem} {_KIND[rng.integers(len(_KIND))]}"
    return f"{stem}{_ENDINGS[rng.integers(len(_ENDINGS))]}"


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join(_WORDS[j] for j in rng.integers(len(_WORDS), size=n))


def _description(rng: np.random.Generator, name: str) -> str:
    """A Wikipedia-brief-like text of 15 to 80 words."""
    n = int(rng.integers(15, 81))
    year = int(rng.integers(1850, 2015))
    return f"{name} ({year}) is a {_words(rng, 3)} {_words(rng, max(1, n - 8))}."


def _sentence(rng: np.random.Generator, mention: str) -> str:
    """10 to 30 words with the mention somewhere inside."""
    n = int(rng.integers(10, 31))
    cut = int(rng.integers(0, n))
    return f"{_words(rng, cut).capitalize()} {mention} {_words(rng, n - cut)}.".strip()


def _mention_text(rng: np.random.Generator, name: str) -> str:
    """The gold's name as text mentions it: mostly whole, sometimes its last word, or lower-cased."""
    r = rng.random()
    if r < 0.15 and " " in name:
        return name.split()[-1]
    if r < 0.2:
        return name.lower()
    return name


def _image_bytes(seed: int, kind: str) -> bytes:
    """One mention image (or a broken one) from its own seed: shapes on a gradient."""
    rng = np.random.default_rng(seed)
    if kind == "empty":
        return b""
    if kind == "html":
        return b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>\n"
    w, h = (int(v) for v in rng.integers(150, 641, size=2))
    base = rng.integers(0, 256, size=3)
    grad = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    pixels = (base[None, None, :] * (0.6 + 0.4 * grad)).astype(np.uint8)
    img = Image.fromarray(np.broadcast_to(pixels, (h, w, 3)).copy())
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(10, w // 2 + 11)), y0 + int(rng.integers(10, h // 2 + 11))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    buf = io.BytesIO()
    if kind == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=85)
    data = buf.getvalue()
    if kind == "truncated":
        data = data[: max(64, len(data) // 3)]
    return data


def _write_images(jobs: list[tuple[str, int, str]]) -> None:
    """Write (path, seed, kind) images (in a worker process)."""
    for path, seed, kind in jobs:
        Path(path).write_bytes(_image_bytes(seed, kind))


def build_like(like: str, out: str | Path, *, scale: float = 1.0, seed: int = 0, workers: int | None = None
               ) -> LikeReport:
    """Write a ``like``-shaped synthetic dataset (scaled) in the DIM release layout to ``out``."""
    if like not in SHAPES:
        raise ValueError(f"like must be one of {', '.join(SHAPES)}, got {like!r}")
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    t0 = time.perf_counter()
    shape = SHAPES[like]
    sizes = {k: max(4, math.ceil(v * scale)) for k, v in shape.items()}
    rng = np.random.default_rng(seed)
    n_kb = sizes["kb"]
    qids = [f"Q{100000 + 7 * i}" for i in range(n_kb)]
    names: list[str] = []
    for _ in range(n_kb):
        names.append(_name(rng, names))
    brief = {q: f"{n} [SEP]. {_description(rng, n)}" for q, n in zip(qids, names)}
    ne2qid = {}
    for q, n in zip(qids, names):
        ne2qid.setdefault(n, q)
    # about two mentions per gold entity, as in the releases; popular entities more often
    n_mentions = sizes["train"] + sizes["dev"] + sizes["test"]
    pool = rng.choice(n_kb, size=min(n_kb, max(2, int(n_mentions / 1.5))), replace=False)
    weights = 1.0 / np.arange(1, len(pool) + 1) ** 0.6
    golds = pool[rng.choice(len(pool), size=n_mentions, p=weights / weights.sum())]
    kinds = rng.choice(["jpeg", "png", *BROKEN], size=n_mentions,
                       p=[0.7 * (1 - sum(BROKEN.values())), 0.3 * (1 - sum(BROKEN.values())), *BROKEN.values()])
    out = Path(out)
    with atomic.building(out) as stage:
        folder, images = stage / "wikipedia", stage / "ImgData" / "wikipedia"
        folder.mkdir(parents=True)
        images.mkdir(parents=True)
        jobs, start = [], 0
        for split in ("train", "dev", "test"):
            records = {}
            for i in range(start, start + sizes[split]):
                key = f"{like}-{i:07d}"
                gold = int(golds[i])
                mention = _mention_text(rng, names[gold])
                ext = "png" if kinds[i] == "png" else "jpg"
                records[key] = {"sentence": _sentence(rng, mention), "mentions": mention, "answer": qids[gold],
                                "imgPath": f"wikipedia/{key}.{ext}", "entities": names[gold]}
                if kinds[i] != "missing":
                    jobs.append((str(images / f"{key}.{ext}"), seed * 10_000_019 + i, str(kinds[i])))
            (folder / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False))
            start += sizes[split]
        (folder / "brief.json").write_text(json.dumps(brief, ensure_ascii=False))
        (folder / "qids_ordered.json").write_text(json.dumps(sorted(qids)))
        (folder / "ne2qid.json").write_text(json.dumps(ne2qid, ensure_ascii=False))
        n_workers = workers or min(8, os.cpu_count() or 1)
        chunks = [jobs[i::n_workers * 4] for i in range(n_workers * 4)]
        with ProcessPoolExecutor(n_workers) as pool_:
            list(pool_.map(_write_images, chunks))
    counts = {str(k): int(v) for k, v in zip(*np.unique(kinds, return_counts=True))}
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report = LikeReport(like=like, scale=scale, out=str(out),
                        mentions={k: sizes[k] for k in ("train", "dev", "test")}, entities=n_kb,
                        images=counts, bytes=total, seconds=round(time.perf_counter() - t0, 2))
    atomic.write_json(asdict(report), out.parent / f"{out.name}.like.json")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m dimkit_dev.like --like wikimel [--scale 0.25] --out DIR``."""
    p = argparse.ArgumentParser(prog="python -m dimkit_dev.like", description=__doc__.splitlines()[0])
    p.add_argument("--like", required=True, choices=tuple(SHAPES))
    p.add_argument("--out", required=True, type=Path, help="folder to write (replaced whole)")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the real sizes, in (0, 1]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="image-writing processes")
    args = p.parse_args(argv)
    print(build_like(args.like, args.out, scale=args.scale, seed=args.seed, workers=args.workers).summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
