"""Load mention images robustly and report the unusable ones (notebook ``00_data``).

Released MEL code trusts every image file: MIMIC turns a missing or unreadable image into an
all-zero tensor without a word, and a single truncated JPEG or decompression bomb can
crash a feature run hours in. Here every image goes through :func:`load_image`, which never raises
for a bad file: it returns an RGB image, possibly converted (and says how), or ``None`` with the
reason. :func:`run` (``dimkit images NAME``) runs it over a prepared dataset, counts the outcomes,
writes ``image_status`` / ``image_converted`` into ``mentions.parquet`` and ``reports/images.json``,
and reuses the stored result of every file whose size and modification time are unchanged.
"""
from __future__ import annotations

import json
import math
import os
import threading
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
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
_ORIENTATION_TAG = 0x0112
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

    @property
    def conversions(self) -> tuple[str, ...]:
        """The conversions applied, in order (empty when the file was plain RGB)."""
        return tuple(self.converted.split("+")) if self.converted else ()


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


def _composite_on_white(rgba: Image.Image) -> Image.Image:
    """Flatten transparency onto white, so transparent areas do not turn black."""
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """Convert a decoded frame of any mode to a new RGB image; list what was changed."""
    mode = img.mode
    conv: list[str] = []
    if mode == "RGB":
        return img.copy(), conv
    if mode in ("P", "PA"):
        conv.append("palette")
        if mode == "PA" or "transparency" in img.info:
            conv.append("alpha")
            return _composite_on_white(img.convert("RGBA")), conv
        return img.convert("RGB"), conv
    if mode == "CMYK":
        conv.append("cmyk")
        return img.convert("RGB"), conv
    if mode.startswith("I;16") or mode == "I":
        conv.append("16bit")
        # 16-bit samples (and 32-bit "I" holding 16-bit PNG/TIFF data) keep their fixed
        # 0..65535 scale; 8-bit data in a 16-bit container stays as it is (scaling it would turn
        # it black); anything outside 0..65535 is stretched.
        arr = np.asarray(img)
        full = 255.0 if arr.size and arr.min() >= 0 and arr.max() <= 255 else 65535.0
        gray = _scale_to_uint8(arr, full)
        return Image.fromarray(gray).convert("RGB"), conv
    if mode == "F":
        conv.append("float")
        arr = np.asarray(img)
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        gray = _scale_to_uint8(arr, 1.0 if hi <= 1.0 else 255.0)
        return Image.fromarray(gray).convert("RGB"), conv
    if mode in ("RGBA", "RGBa", "LA", "La"):
        if mode in ("LA", "La"):
            conv.append("grayscale")
        conv.append("alpha")
        return _composite_on_white(img.convert("RGBA")), conv
    if mode in ("L", "1"):
        conv.append("grayscale")
        return img.convert("RGB"), conv
    conv.append("other_mode")
    return img.convert("RGB"), conv


def _orientation(img: Image.Image) -> tuple[int, str | None]:
    """EXIF orientation (1 when absent); a broken EXIF block is noted, not fatal."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return (int(value) if value in _TRANSPOSE else 1), None
    except Exception as exc:  # EXIF parsing raises many types on damaged blocks
        return 1, f"EXIF ignored ({_describe(exc)})"


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
        reason, detail = _classify_error(exc, head, tail, size)
        return _fail(path, reason, detail)
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
            reason, detail = _classify_error(exc, head, tail, size)
            return _fail(path, reason, detail)
        orientation, note = _orientation(img)
        try:
            rgb, more = _to_rgb(img)
        except MemoryError as exc:
            return _fail(path, "too_large", f"out of memory converting to RGB ({_describe(exc)})")
        except (ValueError, OSError) as exc:
            return _fail(path, "unsupported", f"cannot convert mode {img.mode!r} to RGB ({_describe(exc)})")
        conv.extend(more)
        if orientation != 1:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
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
    def usable(self) -> int:
        """Mentions whose image loads."""
        return int(self.counts.get("ok", 0))

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
        return {
            "dataset": self.dataset,
            "mentions": int(len(self.per_mention)),
            "counts": dict(self.counts),
            "file_counts": dict(self.file_counts),
            "conversions": dict(self.conversions),
            "decoded": self.decoded,
            "reused": self.reused,
            "max_pixels": self.max_pixels,
            "loader_version": LOADER_VERSION,
            "notes": list(self.notes),
            "images_root": dict(self.images_root) if self.images_root is not None else None,
            "examples": {r: self.examples(r) for r in REASONS
                         if r != "no_image" and self.counts.get(r)},
        }

    def summary(self) -> str:
        """Mentions and files per status, conversions, examples of each unusable reason, notes."""
        n = len(self.per_mention)
        lines = [f"images of {self.dataset}: {n} mentions, {self.usable} with a usable image "
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


def _ordered_counts(counter: Counter, order: Iterable[str]) -> dict[str, int]:
    keys = list(order)
    out = {k: int(counter[k]) for k in keys if counter.get(k)}
    out.update({k: int(v) for k, v in sorted(counter.items()) if k not in out and v})
    return out


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


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns)


def run(cfg: ImagesConfig, *, dataset: datasets.Dataset | None = None, progress: bool = True) -> ImageReport:
    """Load every distinct mention image of a prepared dataset and count the outcomes by reason.

    With ``cfg.write`` the ``image_status`` ("ok" or the reason) and ``image_converted`` columns
    are written into ``mentions.parquet`` (and the dataset's ``mentions``), and ``reports/images.json``
    keeps the summary plus each file's result keyed by (path, size, mtime), so a rerun on unchanged
    files decodes nothing. ``dataset``: the loaded ``cfg.dataset``, when the caller holds it.
    """
    cfg = cfg.replace()  # a checked copy
    ds = load_dataset(cfg, dataset)
    max_pixels, workers = cfg.max_pixels, cfg.workers
    mentions = ds.mentions
    report_path = Path(ds.root) / REPORT_FILE
    previous = _read_previous(report_path, max_pixels)

    rels = [r for r in pd.unique(mentions["image"].dropna()) if isinstance(r, str) and r]
    results: dict[str, dict] = {}
    todo: list[tuple[str, Path, tuple[int, int] | None]] = []
    refused: dict[str, dict] = {}
    for rel in rels:
        try:
            path = ds.image_path(rel)
        except DataError as exc:  # leads out of the dataset: never stat'ed nor opened
            refused[rel] = {"status": "outside_root", "converted": None, "detail": exc.reason,
                            "size": None, "mtime_ns": None}
            continue
        key = _file_key(path)
        old = previous.get(rel)
        # A file still missing (key None, stored size None) is reused too: nothing to re-read.
        # An outside_root verdict carries no key either, and is decided afresh above.
        stored = ([old.get("size"), old.get("mtime_ns")]
                  if isinstance(old, dict) and old.get("status") != "outside_root" else None)
        if stored is not None and stored == (list(key) if key is not None else [None, None]):
            results[rel] = old
        else:
            todo.append((rel, path, key))
    reused = len(results)
    results.update(refused)

    def work(item: tuple[str, Path, tuple[int, int] | None]) -> tuple[str, dict]:
        rel, path, key = item
        # load_image is looked up at call time so tests can count decodes.
        res = load_image(path, max_pixels=max_pixels)
        entry = {"status": res.status, "converted": res.converted, "detail": res.detail,
                 "size": key[0] if key else None, "mtime_ns": key[1] if key else None}
        res.image = None  # the check only needs the verdict; free the pixels now
        return rel, entry

    if todo:
        n_workers = workers if workers is not None else min(4, os.cpu_count() or 1)
        bar_kwargs = {} if progress else {"disable": True}  # TQDM_DISABLE wins unless we disable
        with tqdm(total=len(todo), desc=f"images {ds.name}", unit="img", **bar_kwargs) as bar:
            if n_workers <= 1:
                for item in todo:
                    rel, entry = work(item)
                    results[rel] = entry
                    bar.update(1)
            else:
                with ThreadPoolExecutor(max_workers=n_workers) as pool:
                    futures = [pool.submit(work, item) for item in todo]
                    for fut in as_completed(futures):
                        rel, entry = fut.result()
                        results[rel] = entry
                        bar.update(1)

    status, converted, detail = [], [], []
    for img in mentions["image"]:
        entry = results.get(img) if isinstance(img, str) and img else None
        if entry is None:
            status.append("no_image")
            converted.append(None)
            detail.append("the mention has no image")
        else:
            status.append(entry["status"])
            converted.append(entry.get("converted"))
            detail.append(entry.get("detail"))
    per_mention = pd.DataFrame({
        "mention_id": mentions["mention_id"].astype(str).tolist(),
        "image": [i if isinstance(i, str) and i else None for i in mentions["image"]],
        "status": status,
        "converted": converted,
        "detail": detail,
    })

    counts = _ordered_counts(Counter(status), ("ok",) + REASONS)
    conv_counter: Counter = Counter()
    for c in converted:
        if c:
            conv_counter.update(c.split("+"))
    conversions = _ordered_counts(conv_counter, CONVERSIONS)
    file_counts = _ordered_counts(Counter(e["status"] for e in results.values()), ("ok",) + REASONS)

    notes = []
    images_root = _images_root(ds, [r for r in rels if r not in refused])
    missing_dirs = sorted({str(Path(e["detail"].split(": ", 1)[1]))
                           for e in results.values()
                           if e["status"] == "missing" and (e.get("detail") or "").startswith("folder not found")})
    if images_root is not None and not images_root["exists"]:
        notes.append(_missing_root_note(ds, images_root))
        # every folder below a missing root is missing too: the folder names are not the cause
        top = Path(images_root["path"])
        missing_dirs = [d for d in missing_dirs if not Path(d).is_relative_to(top)]
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
                         reused=reused, max_pixels=max_pixels, notes=notes, images_root=images_root)
    if cfg.write:
        _write_status(ds, per_mention)
        summary = report.to_dict()
        summary["files"] = {rel: results[rel] for rel in sorted(results)}
        atomic.write_text(json.dumps(summary, indent=1, sort_keys=False) + "\n", report_path)
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
        hop = path
        for _ in range(40):
            if not hop.is_symlink():
                break
            hop = Path(os.path.normpath(hop.parent / os.readlink(hop)))
        target = str(hop)
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
    same_rows = (len(on_disk) == len(per_mention)
                 and on_disk["mention_id"].astype(str).tolist() == per_mention["mention_id"].tolist())
    if not same_rows:
        raise DataError("mentions.parquet changed since the dataset was loaded; load it again and "
                        "rerun the image check", file=target, field="mention_id")
    new_status = [str(s) for s in per_mention["status"]]
    # pandas 3 reads None in a string column back as NaN; compare and store plain None.
    new_conv = [c if isinstance(c, str) else None for c in per_mention["converted"]]
    ds.mentions["image_status"] = new_status
    ds.mentions["image_converted"] = new_conv
    if ("image_status" in on_disk.columns and "image_converted" in on_disk.columns
            and on_disk["image_status"].tolist() == new_status
            and [c if isinstance(c, str) else None for c in on_disk["image_converted"]] == new_conv):
        return
    on_disk["image_status"] = pd.Series(new_status, dtype=object)
    on_disk["image_converted"] = pd.Series(new_conv, dtype=object)
    atomic.write_parquet(on_disk, target)


#: The command line: ``dimkit images NAME`` takes the flags of :class:`ImagesConfig`.
CONFIG = ImagesConfig
