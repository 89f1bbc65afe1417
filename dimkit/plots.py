"""One plotting policy for every notebook and figure: sizes, fonts, saving by name."""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

from . import paths

DEFAULT_FIGSIZE = (7.0, 4.0)


def set_style() -> None:
    """Apply dimkit's matplotlib defaults (called by every plotting helper)."""
    matplotlib.rcParams.update({
        "figure.figsize": DEFAULT_FIGSIZE,
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "legend.frameon": False,
    })


def save_figure(fig, name: str, folder: str | Path | None = None) -> list[Path]:
    """Save ``fig`` as ``<folder>/<name>.png`` and ``.pdf`` (default folder: ``$DIMKIT_FIGURES``)."""
    folder = Path(folder) if folder is not None else paths.figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for ext in ("png", "pdf"):
        p = folder / f"{name}.{ext}"
        # Fixed metadata keeps the files byte-stable across reruns (no creation dates).
        meta = {"Software": None} if ext == "png" else {"CreationDate": None, "Creator": None, "Producer": None}
        fig.savefig(p, metadata=meta)
        out.append(p)
    return out


def image_grid(images: Sequence, captions: Sequence[str], *, ncols: int = 4, width: float = 2.4,
               wrap: int = 34, title: str | None = None):
    """Show images (PIL or None for an unusable one) in a grid with wrapped captions; returns the figure."""
    import matplotlib.pyplot as plt

    set_style()
    n = max(len(images), 1)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, width * 1.6 * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, cap in zip(axes.flat, images, captions):
        if img is None:
            ax.text(0.5, 0.5, "unusable image", ha="center", va="center", color="crimson")
        else:
            ax.imshow(img)
        lines = [w for part in str(cap).split("\n") for w in textwrap.wrap(part, wrap)]
        ax.set_title("\n".join(lines[:8]), fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def mention_grid(ds, mentions, *, extra: dict[str, Sequence[str]] | None = None, ncols: int = 4,
                 title: str | None = None):
    """Mentions (rows of ``ds.mentions``) as image + mention + sentence + gold, plus extra caption lines."""
    from .images import load_dataset_image

    ents = ds.entities.set_index("qid")["name"]
    images, captions = [], []
    for i, (_, row) in enumerate(mentions.iterrows()):
        img = load_dataset_image(ds, row["image"]).image
        gold = row["qid"]
        lines = [f"[{row['mention']}] {row['sentence']}",
                 f"gold: {gold} {ents.get(gold, '') if gold else '(NIL)'}"]
        for label, values in (extra or {}).items():
            lines.append(f"{label}: {values[i]}")
        images.append(img)
        captions.append("\n".join(lines))
    return image_grid(images, captions, ncols=ncols, title=title)
