"""Mention images: load them robustly, check a dataset's, and hash the usable ones (notebook ``00_data``).

Released MEL code trusts every image file: MIMIC turns a missing or unreadable image into an all-zero
tensor without a word, and one truncated JPEG or decompression bomb can crash a feature run hours in.
:func:`load_image` never raises for a bad file: it returns an RGB image (saying how it was converted)
or None with the reason. :func:`run` (``dimkit images NAME``) checks every mention image of a dataset,
writes ``image_status`` into ``mentions.parquet`` and ``reports/images.json``, and reuses the result
of every file whose size and modification time are unchanged. :func:`scan_images` gives cues and
features the usable images and the SHA-256 of their bytes, under which their results are stored.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import ClassVar, Iterable

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from . import atomic, datasets
from .errors import DataError
from .stage import Config, Result, load_dataset, setting
from .store import Store, default_store_path, make_key

#: Why an image is unusable. ``unreadable`` covers files the OS refuses (permission, a folder);
#: ``outside_root`` paths that lead out of the dataset's images (never opened).
REASONS = ("no_image", "missing", "empty", "truncated", "corrupt", "svg", "too_large",
           "unsupported", "unreadable", "outside_root")
#: How a usable image was changed on the way to RGB (several may apply; joined with '+').
CONVERSIONS = ("animated_first_frame", "palette", "cmyk", "16bit", "float", "alpha", "grayscale",
               "other_mode", "exif_rotated")
#: Pillow's own default warning threshold (about 89.5 megapixels); fixed here so that a caller's
#: change to ``PIL.Image.MAX_IMAGE_PIXELS`` does not silently change dimkit's results.
DEFAULT_MAX_PIXELS = 89_478_485
#: Bump when load_image classifies or converts differently: stored results are then re-checked.
LOADER_VERSION = 1
REPORT_FILE = "reports/images.json"

_SVG_SUFFIXES = (".svg", ".svgz")
# Formats Pillow cannot read here but that we can name, so the report says "unsupported: HEIC"
# rather than "corrupt".
_KNOWN_UNSUPPORTED = (
    (b"%PDF", "PDF document"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)
# Image.open only parses headers, so serialising it costs little; the lock keeps concurrent
# warnings.catch_warnings blocks from restoring each other's filters out of order (which would
# leave our filter in place for good).
_OPEN_LOCK = threading.Lock()
#: EXIF orientation -> the transposition that displays the image upright.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass
class LoadedImage:
    """Outcome of loading one image: an RGB image, or None and the reason it is unusable."""

    image: Image.Image | None
    reason: str | None = None
    converted: str | None = None
    detail: str | None = None
    path: Path | None = None

    @property
    def ok(self) -> bool:
        """True when the image is usable."""
        return self.reason is None

    @property
    def status(self) -> str:
        """``"ok"`` or the reason the image is unusable."""
        return "ok" if self.reason is None else self.reason


def _fail(path: Path | None, reason: str, detail: str | None) -> LoadedImage:
    return LoadedImage(image=None, reason=reason, converted=None, detail=detail, path=path)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        # Its message embeds the repr of our file object, which says nothing useful.
        return "UnidentifiedImageError: cannot identify image file"
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def _sniff(head: bytes) -> str | None:
    """Name of a non-raster file type recognised from its first bytes, or None."""
    text = head.lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<svg", b"<?xml", b"<!doctype svg")) and b"<svg" in text:
        return "svg"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "html"
    if text.startswith((b"<?xml", b"<!doctype", b"<!--")):
        return "xml"
    return None


def _looks_truncated(head: bytes, tail: bytes, size: int) -> bool:
    """Whether a file that failed to decode lacks its format's end marker (so it was cut short)."""
    if head.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" not in tail
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" not in tail
    if head.startswith((b"GIF87a", b"GIF89a")):
        return not tail.rstrip(b"\x00").endswith(b"\x3b")
    if head.startswith(b"RIFF") and len(head) >= 12:
        declared = int.from_bytes(head[4:8], "little") + 8
        return size < declared
    return False


def _classify_error(exc: BaseException, head: bytes, tail: bytes, size: int) -> tuple[str, str]:
    """Map an exception raised while opening or decoding a file to (reason, detail)."""
    detail = _describe(exc)
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning, MemoryError)):
        return "too_large", detail
    msg = str(exc).lower()
    if "truncated" in msg or isinstance(exc, EOFError):
        return "truncated", detail
    if "decoder" in msg and "not available" in msg:
        return "unsupported", detail
    if _looks_truncated(head, tail, size):
        return "truncated", f"{detail} (the file lacks its end marker)"
    if isinstance(exc, UnidentifiedImageError):
        for magic, name in _KNOWN_UNSUPPORTED:
            if head.startswith(magic):
                return "unsupported", f"{name} is not readable by Pillow here"
        if head[4:8] == b"ftyp":
            brand = head[8:12].decode("ascii", "replace").strip()
            return "unsupported", f"ISO media file (brand {brand!r}, e.g. HEIC/AVIF) is not readable by Pillow here"
        kind = _sniff(head)
        if kind in ("html", "xml"):
            return "corrupt", f"an {kind.upper()} document, not an image"
        return "corrupt", "not an image Pillow recognises"
    return "corrupt", detail


def _scale_to_uint8(arr: np.ndarray, full_range: float | None) -> np.ndarray:
    """Scale high-bit-depth samples to 0..255 instead of clipping them (which turns them white)."""
    arr = arr.astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.all():
        arr = np.where(finite, arr, 0.0)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if full_range is not None and lo >= 0 and hi <= full_range:
        out = arr * (255.0 / full_range)
    elif hi > lo:
        # Signed or out-of-range data has no fixed scale; stretch what is there.
        out = (arr - lo) * (255.0 / (hi - lo))
    else:
        out = np.zeros_like(arr)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


#: What converting a mode to RGB is called (besides "alpha" for the modes with transparency; any mode
#: not listed is "other_mode").
_MODE_CONVERSIONS = {"P": ["palette"], "PA": ["palette"], "CMYK": ["cmyk"], "L": ["grayscale"], "1": ["grayscale"],
                     "LA": ["grayscale"], "La": ["grayscale"], "RGBA": [], "RGBa": []}


def _to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Convert a decoded frame of any mode to a new RGB image; list what was changed."""
    mode = img.mode
    if mode == "RGB":
        return img.copy(), []
    if mode == "F":
        arr = np.asarray(img)
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        return Image.fromarray(_scale_to_uint8(arr, 1.0 if hi <= 1.0 else 255.0)).convert("RGB"), ["float"]
    if mode.startswith("I;16") or mode == "I":
        # 16-bit samples (and 32-bit "I" holding 16-bit PNG/TIFF data) keep their fixed
        # 0..65535 scale; 8-bit data in a 16-bit container stays as it is (scaling it would turn
        # it black); anything outside 0..65535 is stretched.
        arr = np.asarray(img)
        full = 255.0 if arr.size and arr.min() >= 0 and arr.max() <= 255 else 65535.0
        return Image.fromarray(_scale_to_uint8(arr, full)).convert("RGB"), ["16bit"]
    conv = list(_MODE_CONVERSIONS.get(mode, ["other_mode"]))
    if mode in ("PA", "RGBA", "RGBa", "LA", "La") or (mode == "P" and "transparency" in img.info):
        # flattened onto white, so that transparent areas do not turn black
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB"), conv + ["alpha"]
    return img.convert("RGB"), conv


def load_image(path: str | os.PathLike | None, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Load an image as RGB, or return None with the reason it is unusable; never raises for a bad file.

    The size is checked from the header before decoding (``too_large`` above ``max_pixels``;
    Pillow's own hard limit of ``2 * Image.MAX_IMAGE_PIXELS`` also applies). Animated files give
    their first frame; palette, CMYK, 16-bit, float, grayscale and alpha images are converted and
    EXIF orientation is applied, each recorded in ``converted``.
    """
    if path is None or (isinstance(path, float) and math.isnan(path)):
        return _fail(None, "no_image", "the mention has no image")
    path = Path(path)
    if path.suffix.lower() in _SVG_SUFFIXES:
        return _fail(path, "svg", "SVG is vector graphics; dimkit does not rasterise it")
    try:
        st = path.stat()
    except FileNotFoundError:
        where = "file not found" if path.parent.is_dir() else f"folder not found: {path.parent}"
        return _fail(path, "missing", where)
    except OSError as exc:
        return _fail(path, "unreadable", _describe(exc))
    if path.is_dir():
        return _fail(path, "unreadable", "is a folder, not a file")
    if st.st_size == 0:
        return _fail(path, "empty", "0 bytes")
    try:
        fh = open(path, "rb")
    except OSError as exc:
        return _fail(path, "unreadable", _describe(exc))
    with fh:
        try:
            head = fh.read(4096)
            fh.seek(max(0, st.st_size - 64))
            tail = fh.read(64)
            fh.seek(0)
        except OSError as exc:
            return _fail(path, "unreadable", _describe(exc))
        if _sniff(head) == "svg":
            return _fail(path, "svg", "SVG content (vector graphics); dimkit does not rasterise it")
        return _decode(fh, path, head, tail, st.st_size, max_pixels)


def load_dataset_image(ds: "datasets.Dataset", rel: str | None, **kwargs) -> LoadedImage:
    """:func:`load_image` of a dataset-relative path; a path out of the dataset's images is
    ``outside_root`` (never opened), as in the image check."""
    try:
        path = ds.image_path(rel)
    except DataError as exc:
        return _fail(None, "outside_root", exc.reason)
    return load_image(path, **kwargs)


def _decode(fh, path: Path, head: bytes, tail: bytes, size: int, max_pixels: int) -> LoadedImage:
    """Open, size-check, decode and convert an open image file."""
    try:
        with _OPEN_LOCK, warnings.catch_warnings():
            # Pillow warns between 1x and 2x its limit; our own max_pixels check decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fh)
    except Exception as exc:  # Pillow plugins raise many types (SyntaxError, struct.error, ...)
        return _fail(path, *_classify_error(exc, head, tail, size))
    with img:
        width, height = img.size
        if width <= 0 or height <= 0:
            return _fail(path, "corrupt", f"header gives size {width}x{height}")
        if width * height > max_pixels:
            return _fail(path, "too_large",
                         f"{width}x{height} = {width * height:,} pixels > max_pixels={max_pixels:,} "
                         "(checked from the header; not decoded)")
        conv: list[str] = []
        try:
            # MPO (camera JPEG with a preview frame) is "animated" to Pillow but is a photo.
            if img.format != "MPO" and getattr(img, "is_animated", False):
                conv.append("animated_first_frame")
                img.seek(0)
            # Decode now, inside the try: a truncated or damaged file fails here, not later.
            img.load()
        except Exception as exc:
            return _fail(path, *_classify_error(exc, head, tail, size))
        try:  # EXIF orientation; a damaged EXIF block (parsing raises many types) is noted, not fatal
            transpose, note = _TRANSPOSE.get(img.getexif().get(0x0112, 1)), None
        except Exception as exc:
            transpose, note = None, f"EXIF ignored ({_describe(exc)})"
        try:
            rgb, more = _to_rgb(img)
        except MemoryError as exc:
            return _fail(path, "too_large", f"out of memory converting to RGB ({_describe(exc)})")
        except (ValueError, OSError) as exc:
            return _fail(path, "unsupported", f"cannot convert mode {img.mode!r} to RGB ({_describe(exc)})")
        conv.extend(more)
        if transpose is not None:
            rgb = rgb.transpose(transpose)
            conv.append("exif_rotated")
        return LoadedImage(image=rgb, reason=None, converted="+".join(conv) or None,
                           detail=note, path=path)


# --------------------------------------------------------------------------------------------
# Dataset check: ImagesConfig -> run -> ImageReport


@dataclass
class ImagesConfig(Config):
    """What ``dimkit images NAME`` checks, and how."""

    STAGE: ClassVar[str] = "images"

    dataset: str = setting(None, "prepared dataset name (e.g. sample, rich+)", positional=True)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, "images larger than this (from the header) are 'too_large'",
                              min=1)
    workers: int | None = setting(None, "decoding threads (default: up to 4)", min=1)
    write: bool = setting(True, "write image_status into mentions.parquet and reports/images.json "
                                "(--no-write: only report)")


@dataclass
class ImageReport(Result):
    """What :func:`run` found: counts per status and conversion, and per mention."""

    dataset: str
    counts: dict[str, int]
    conversions: dict[str, int]
    file_counts: dict[str, int]
    per_mention: pd.DataFrame = field(repr=False)
    decoded: int = 0
    reused: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    notes: list[str] = field(default_factory=list)
    report_path: Path | None = None
    #: The top folder of the image paths (``images``): ``path``, ``link_target`` (where its chain
    #: of links ends, None for a plain folder) and ``exists``; None when no path has a folder.
    images_root: dict | None = None

    @property
    def unusable(self) -> pd.DataFrame:
        """Rows of ``per_mention`` whose image exists in the data but cannot be used."""
        pm = self.per_mention
        return pm[~pm["status"].isin(["ok", "no_image"])].reset_index(drop=True)

    def examples(self, status: str, n: int = 5) -> list[str]:
        """Up to ``n`` distinct image paths with this status."""
        pm = self.per_mention
        return pm.loc[pm["status"] == status, "image"].dropna().drop_duplicates().head(n).tolist()

    def to_frame(self) -> pd.DataFrame:
        """One row per status: mentions and distinct image files."""
        order = ["ok"] + [r for r in REASONS if r in self.counts or r in self.file_counts]
        rows = [{"status": s, "mentions": int(self.counts.get(s, 0)),
                 "files": int(self.file_counts.get(s, 0))} for s in order]
        return pd.DataFrame(rows, columns=["status", "mentions", "files"])

    def to_dict(self) -> dict:
        """JSON-ready summary (counts, conversions, a few examples per unusable reason)."""
        return {"dataset": self.dataset, "mentions": len(self.per_mention), "counts": dict(self.counts),
                "file_counts": dict(self.file_counts), "conversions": dict(self.conversions),
                "decoded": self.decoded, "reused": self.reused, "max_pixels": self.max_pixels,
                "loader_version": LOADER_VERSION, "notes": list(self.notes),
                "images_root": dict(self.images_root) if self.images_root is not None else None,
                "examples": {r: self.examples(r) for r in REASONS if r != "no_image" and self.counts.get(r)}}

    def summary(self) -> str:
        """Mentions and files per status, conversions, examples of each unusable reason, notes."""
        n = len(self.per_mention)
        lines = [f"images of {self.dataset}: {n} mentions, {self.counts.get('ok', 0)} with a usable image "
                 f"({self.decoded} files decoded, {self.reused} reused from the last check)"]
        frame = self.to_frame()
        lines += ["  " + line for line in frame.to_string(index=False).splitlines()]
        if self.conversions:
            conv = ", ".join(f"{k} {v}" for k, v in self.conversions.items())
            lines.append(f"  converted (mentions): {conv}")
        for reason in REASONS:
            ex = self.examples(reason, 3) if reason != "no_image" else []
            if ex:
                lines.append(f"  {reason}: e.g. {', '.join(ex)}")
        lines += [f"  note: {note}" for note in self.notes]
        if self.report_path is not None:
            lines.append(f"  report: {self.report_path}")
        return "\n".join(lines)


def _ordered_counts(values: Iterable[str], order: Iterable[str]) -> dict[str, int]:
    """Non-zero counts of ``values``, the keys in ``order`` first, then any others sorted."""
    counter = Counter(values)
    keys = list(dict.fromkeys([*order, *sorted(counter)]))
    return {k: int(counter[k]) for k in keys if counter[k]}


def _read_previous(path: Path, max_pixels: int) -> dict[str, dict]:
    """Stored per-file results of the last check, if they were made the same way."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if data.get("loader_version") != LOADER_VERSION or data.get("max_pixels") != max_pixels:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def run(cfg: ImagesConfig, *, dataset: datasets.Dataset | None = None, progress: bool = True) -> ImageReport:
    """Load every distinct mention image of a prepared dataset and count the outcomes by reason.

    With ``cfg.write`` the ``image_status`` ("ok" or the reason) and ``image_converted`` columns
    are written into ``mentions.parquet`` (and the dataset's ``mentions``), and ``reports/images.json``
    keeps the summary plus each file's result keyed by (path, size, mtime), so a rerun on unchanged
    files decodes nothing. ``dataset``: the loaded ``cfg.dataset``, when the caller holds it.
    """
    cfg = cfg.replace()  # a checked copy
    ds = load_dataset(cfg, dataset)
    mentions = ds.mentions
    report_path = Path(ds.root) / REPORT_FILE
    previous = _read_previous(report_path, cfg.max_pixels)

    rels = [r for r in pd.unique(mentions["image"].dropna()) if isinstance(r, str) and r]
    results: dict[str, dict] = {}
    todo: list[tuple[str, Path, dict]] = []
    refused: set[str] = set()
    for rel in rels:
        try:
            path = ds.image_path(rel)
        except DataError as exc:  # leads out of the dataset: never stat'ed nor opened
            refused.add(rel)
            results[rel] = {"status": "outside_root", "converted": None, "detail": exc.reason,
                            "size": None, "mtime_ns": None}
            continue
        try:
            st = path.stat()
            stamp = {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}
        except OSError:
            stamp = {"size": None, "mtime_ns": None}
        old = previous.get(rel)
        # A file still missing (no size) is reused too: nothing to re-read. An outside_root verdict
        # has no size either, and is decided afresh above.
        if (isinstance(old, dict) and old.get("status") != "outside_root"
                and [old.get("size"), old.get("mtime_ns")] == [stamp["size"], stamp["mtime_ns"]]):
            results[rel] = old
        else:
            todo.append((rel, path, stamp))
    reused = len(results) - len(refused)

    def work(item: tuple[str, Path, dict]) -> tuple[str, dict]:
        rel, path, stamp = item
        # load_image is looked up at call time so tests can count decodes; only the verdict is kept.
        res = load_image(path, max_pixels=cfg.max_pixels)
        return rel, {"status": res.status, "converted": res.converted, "detail": res.detail, **stamp}

    if todo:
        workers = cfg.workers or min(4, os.cpu_count() or 1)
        bar_kwargs = {} if progress else {"disable": True}  # TQDM_DISABLE wins unless we disable
        with (ThreadPoolExecutor(max_workers=workers) as pool,
              tqdm(total=len(todo), desc=f"images {ds.name}", unit="img", **bar_kwargs) as bar):
            for rel, entry in pool.map(work, todo):
                results[rel] = entry
                bar.update(1)

    no_image = {"status": "no_image", "converted": None, "detail": "the mention has no image"}
    images = [i if isinstance(i, str) and i else None for i in mentions["image"]]
    entries = [results[i] if i is not None else no_image for i in images]
    per_mention = pd.DataFrame({
        "mention_id": mentions["mention_id"].astype(str).tolist(),
        "image": images,
        "status": [e["status"] for e in entries],
        "converted": [e.get("converted") for e in entries],
        "detail": [e.get("detail") for e in entries],
    })
    counts = _ordered_counts(per_mention["status"], ("ok",) + REASONS)
    conversions = _ordered_counts([c for e in entries if e.get("converted") for c in e["converted"].split("+")],
                                  CONVERSIONS)
    file_counts = _ordered_counts((e["status"] for e in results.values()), ("ok",) + REASONS)

    notes = []
    images_root = _images_root(ds, [r for r in rels if r not in refused])
    missing_dirs = sorted({e["detail"].split(": ", 1)[1] for e in results.values()
                           if e["status"] == "missing" and (e.get("detail") or "").startswith("folder not found")})
    if images_root is not None and not images_root["exists"]:
        notes.append(_missing_root_note(ds, images_root))
        # every folder below a missing root is missing too: the folder names are not the cause
        missing_dirs = [d for d in missing_dirs if not Path(d).is_relative_to(images_root["path"])]
    if missing_dirs:
        shown = ", ".join(missing_dirs[:3]) + (" ..." if len(missing_dirs) > 3 else "")
        notes.append(f"image folder(s) not found: {shown} -- check the folder name "
                     "(the RichpediaMEL archive ships 'mention_images', MIMIC expects 'mention_image')")
    if refused:
        shown = ", ".join(sorted(refused)[:3]) + (" ..." if len(refused) > 3 else "")
        notes.append(f"{len(refused)} image path(s) lead outside the dataset's image folder and "
                     f"were not opened (outside_root): {shown} -- a link in the raw image folder "
                     "points elsewhere, or mentions.parquet was edited; see the details in "
                     f"{REPORT_FILE}")
    if rels and counts.get("ok", 0) == 0:
        notes.append("no mention has a usable image: image features would all be zeros")

    report = ImageReport(dataset=ds.name, counts=counts, conversions=conversions,
                         file_counts=file_counts, per_mention=per_mention, decoded=len(todo),
                         reused=reused, max_pixels=cfg.max_pixels, notes=notes, images_root=images_root)
    if cfg.write:
        _write_status(ds, per_mention)
        atomic.write_json({**report.to_dict(), "files": {rel: results[rel] for rel in sorted(results)}},
                          report_path)
        report.report_path = report_path
    return report


def _images_root(ds: datasets.Dataset, rels: list[str]) -> dict | None:
    """The top folder most image paths start with (``images``), whether it is a link, and if it exists."""
    parts = [PurePosixPath(r.replace("\\", "/")).parts for r in rels]
    tops = Counter(p[0] for p in parts if len(p) > 1)
    if not tops:
        return None
    path = Path(ds.root) / tops.most_common(1)[0][0]
    target = None
    if path.is_symlink():
        # Follow the chain (a '+' dataset links to its source's images/, which links the raw folder).
        target = path
        for _ in range(40):
            if not target.is_symlink():
                break
            target = Path(os.path.normpath(target.parent / os.readlink(target)))
        target = str(target)
    return {"path": str(path), "link_target": target, "exists": path.is_dir()}


def _missing_root_note(ds: datasets.Dataset, root: dict) -> str:
    """Why no image can be read: the image folder (or the folder its link points to) is gone."""
    src = ds.meta.get("source") or "SRC"
    name = ds.meta.get("augmented_from") or ds.name
    if root["link_target"] is not None:
        return (f"{Path(root['path']).name}/ is a link to {root['link_target']}, which no longer "
                "exists: the raw image folder was moved or deleted; prepare again with "
                f"`dimkit prepare {src} --name {name} --images NEW_FOLDER` (or re-point the link)")
    return (f"{root['path']} does not exist: no image can be read; prepare again with "
            f"`dimkit prepare {src} --name {name} --images IMAGE_FOLDER`")


def _write_status(ds: datasets.Dataset, per_mention: pd.DataFrame) -> None:
    """Add/update ``image_status`` and ``image_converted`` in mentions.parquet (skipped if unchanged)."""
    target = Path(ds.root) / "mentions.parquet"
    on_disk = pd.read_parquet(target)
    if on_disk["mention_id"].astype(str).tolist() != per_mention["mention_id"].tolist():
        raise DataError("mentions.parquet changed since the dataset was loaded; load it again and "
                        "rerun the image check", file=target, field="mention_id")
    def plain(values) -> list:  # pandas 3 reads None in a string column back as NaN: compare plain None
        return [v if isinstance(v, str) else None for v in values]

    new_status, new_conv = per_mention["status"].astype(str).tolist(), plain(per_mention["converted"])
    ds.mentions["image_status"] = new_status
    ds.mentions["image_converted"] = new_conv
    if ({"image_status", "image_converted"} <= set(on_disk.columns)
            and on_disk["image_status"].tolist() == new_status and plain(on_disk["image_converted"]) == new_conv):
        return
    on_disk["image_status"] = pd.Series(new_status, dtype=object)
    on_disk["image_converted"] = pd.Series(new_conv, dtype=object)
    atomic.write_parquet(on_disk, target)


#: The command line: ``dimkit images NAME`` takes the flags of :class:`ImagesConfig`.
CONFIG = ImagesConfig


# --------------------------------------------------------------------------------------------
# For cues and features: which mention images are usable, and what their bytes hash to.
# Their results are stored under the SHA-256 of the image bytes, so a renamed or copied file reuses
# them and an edited one is recomputed; each hash is kept under (path, size, mtime), so that 25K
# images are not read again on every run.

HASH_KIND = "file_sha256"


@dataclass
class ImageFile:
    """One image file of a dataset: its status ("ok" or the reason it is unusable) and content hash."""

    rel: str
    path: Path | None
    status: str
    sha256: str | None = None


@dataclass
class ImageScan:
    """Usability and hashes of a dataset's mention images."""

    files: dict[str, ImageFile]
    per_mention: pd.DataFrame  # mention_id, image, images (list), status (of ``image``)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(paths: list[Path], *, progress: bool = True) -> dict[Path, str | None]:
    """SHA-256 of each file's bytes (None when unreadable); unchanged files reuse their stored hash."""
    out: dict[Path, str | None] = dict.fromkeys(paths)
    keys: dict[Path, str] = {}
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        keys[p] = make_key(HASH_KIND, "sha256", "1",
                           {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    with Store(default_store_path("file_hashes")) as store:
        known = store.get_many(keys.values())
        todo = [p for p, k in keys.items() if k not in known]
        out.update({p: known[k]["sha256"] for p, k in keys.items() if k in known})
        rows = []
        bar_kw = {} if progress and todo else {"disable": True}  # else TQDM_DISABLE decides
        for p in tqdm(todo, desc="hashing images", unit="img", **bar_kw):
            try:
                out[p] = sha256_file(p)
            except OSError:
                continue
            rows.append((keys[p], {"sha256": out[p]}, str(p)))
        store.put_many(rows, kind=HASH_KIND, model="sha256", version="1")
    return out


def scan_images(ds: datasets.Dataset, *, progress: bool = True, flag: bool = True) -> ImageScan:
    """Check every mention image (flagging ``image_status`` in mentions.parquet) and hash the usable ones."""
    report = run(ImagesConfig.for_dataset(ds.name, write=flag), dataset=ds, progress=progress)
    status_of = dict(zip(report.per_mention["image"], report.per_mention["status"]))
    # every image of a mention: its ``images`` list (Richpedia) or else [image]
    m = ds.mentions
    lists = []
    for img, more in zip(m["image"], m["images"] if "images" in m.columns else [None] * len(m)):
        if more is not None and not isinstance(more, (str, float)) and len(more):
            lists.append([str(x) for x in more if isinstance(x, str) and x])
        else:
            lists.append([img] if isinstance(img, str) and img else [])
    files: dict[str, ImageFile] = {}
    for rel in dict.fromkeys(rel for rels in lists for rel in rels):
        try:
            path = ds.image_path(rel)
        except DataError:  # leads out of the dataset's images: never opened nor hashed
            files[rel] = ImageFile(rel=rel, path=None, status="outside_root")
            continue
        # Extra images (Richpedia's img_list) are not covered by the mention-image check.
        status = status_of[rel] if rel in status_of else load_image(path).status
        files[rel] = ImageFile(rel=rel, path=path, status=status)
    ok = [f for f in files.values() if f.status == "ok"]
    hashes = hash_files([f.path for f in ok], progress=progress)
    for f in ok:
        f.sha256 = hashes.get(f.path)
        if f.sha256 is None:  # vanished between the check and the hash
            f.status = "missing"
    per_mention = pd.DataFrame({
        "mention_id": m["mention_id"].astype(str).tolist(),
        "image": [r if isinstance(r, str) and r else None for r in m["image"]],
        "images": lists,
        "status": [files[r].status if isinstance(r, str) and r in files else "no_image" for r in m["image"]],
    })
    return ImageScan(files=files, per_mention=per_mention)
