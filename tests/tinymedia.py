"""Tiny prepared datasets with real image files, and a tiny random BLIP-2, for the cue/feature tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from dimkit import datasets

#: Per mention: (mention_id, split, mention, sentence, image file or None, qid).
MENTIONS = [
    ("m1", "train", "Vessendor", "Vessendor left port early.", "a.png", "Q1"),
    ("m2", "train", "Vessendor", "A photo of Vessendor.", "b.png", "Q2"),
    ("m3", "dev", "Pellmarsh", "Pellmarsh under the sky.", "c.png", "Q3"),
    ("m4", "test", "Pellmarsh", "Pellmarsh again.", "a.png", "Q1"),         # shares a.png with m1
    ("m5", "test", "Callowmere", "Callowmere is here.", "missing.png", "Q4"),  # file never written
    ("m6", "train", "Callowmere", "Callowmere at night.", "corrupt.png", "Q4"),
    ("m7", "dev", "Nobody", "No picture here.", None, None),
]
ENTITIES = [
    ("Q1", "Vessendor", "a research vessel with a teal hull"),
    ("Q2", "Vessendor", "a toy company with an orange ring logo"),
    ("Q3", "Pellmarsh", "a mountain with a blue peak"),
    ("Q4", "Callowmere", None),
]
CUES = {"a.png": "a teal boat on blue water", "b.png": "an orange ring", "c.png": "a blue mountain"}


def draw(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    """A small PNG: a flat colour plus seeded noise (different bytes per seed)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None, :] + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype("uint8")
    Image.fromarray(arr).save(path)


def make_dataset(data_dir: Path, name: str = "tiny", *, plus: bool = False,
                 descriptions: dict[str, str | None] | None = None) -> datasets.Dataset:
    """Write a prepared dataset ``name`` under ``data_dir`` (images in ``<root>/img/``) and load it."""
    root = data_dir / datasets.canonical_name(name)
    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    if not (img / "a.png").exists():
        draw(img / "a.png", (20, 120, 120), 1)
        draw(img / "b.png", (230, 120, 20), 2)
        draw(img / "c.png", (40, 60, 220), 3)
        (img / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    mentions = pd.DataFrame([{"mention_id": mid, "split": sp, "mention": m, "sentence": s,
                              "image": f"img/{f}" if f else None, "qid": q}
                             for mid, sp, m, s, f, q in MENTIONS])
    desc = {q: d for q, _, d in ENTITIES}
    desc.update(descriptions or {})
    ents = pd.DataFrame([{"qid": q, "name": n, "description": desc[q], "description_source": "test",
                          "images": []} for q, n, _ in ENTITIES])
    if plus:
        ents["description_original"] = [f"{n} is a notable entity." for _, n, _ in ENTITIES]
    datasets.write_prepared(root, mentions, ents, {"layout": "test"})
    return datasets.load(name, data_dir=data_dir)


def write_cue_file(path: Path, cues: dict[str, str] | None = None, expert: str = "test-oracle") -> Path:
    """A replay file in the sample's format (keys relative to the image folder)."""
    path.write_text(json.dumps({"expert": expert, "prompt": "who?", "note": "test cues",
                                "cues": cues if cues is not None else CUES}))
    return path


def tiny_blip2(folder: Path, seed: int = 0) -> Path:
    """Build a tiny random BLIP-2 (offline.md recipe) and save model + processor like a downloaded checkpoint."""
    from dimkit_dev.tiny_blip2 import random_blip2

    model, processor = random_blip2("tiny", seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
