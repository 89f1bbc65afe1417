"""Which mention images are usable and what their bytes hash to (shared by cues and features).

Cues and image features are stored under the SHA-256 of the image *bytes*, so a renamed or copied
file reuses its stored results and an edited one is recomputed. Hashing 25K images on every run
would be wasted work, so each file's hash is kept in ``$DIMKIT_CACHE/file_hashes.sqlite`` under its
(path, size, modification time). Usability comes from :func:`dimkit.images.run`,
which also writes ``image_status`` into ``mentions.parquet`` -- an unusable image is flagged there,
counted in the reports, and gets no cue and a zero image feature; never silently.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import images as images_mod
from .errors import DataError
from .store import Store, default_store_path, make_key

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

    def status_counts(self) -> dict[str, int]:
        """Mentions per image status (``ok``, ``missing``, ``no_image`` ...)."""
        return {str(k): int(v) for k, v in self.per_mention["status"].value_counts().items()}


def _is_path(v) -> bool:
    return isinstance(v, str) and bool(v)


def mention_image_lists(ds) -> list[list[str]]:
    """Per mention, every image it has: the ``images`` list (Richpedia) or else ``[image]``."""
    m = ds.mentions
    lists: list[list[str]] = []
    has_list = "images" in m.columns
    for i, img in enumerate(m["image"].tolist()):
        extra = m["images"].iloc[i] if has_list else None
        if extra is not None and not isinstance(extra, (str, float)) and len(extra):
            lists.append([str(x) for x in extra if _is_path(x)])
        else:
            lists.append([img] if _is_path(img) else [])
    return lists


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_files(paths: list[Path], *, store: Store | None = None, progress: bool = True) -> dict[Path, str | None]:
    """SHA-256 of each file's bytes, reusing stored hashes of files whose size and mtime are unchanged."""
    own = store is None
    store = store or Store(default_store_path("file_hashes"))
    try:
        keys: dict[Path, str] = {}
        for p in paths:
            try:
                st = p.stat()
            except OSError:
                continue
            keys[p] = make_key(HASH_KIND, "sha256", "1",
                               {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
        known = store.get_many(keys.values())
        out: dict[Path, str | None] = {p: None for p in paths}
        todo = []
        for p, k in keys.items():
            if k in known:
                out[p] = known[k]["sha256"]
            else:
                todo.append(p)
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
    finally:
        if own:
            store.close()


def scan_images(ds, *, progress: bool = True, flag: bool = True) -> ImageScan:
    """Check every mention image (flagging ``image_status`` in mentions.parquet) and hash the usable ones."""
    report = images_mod.run(images_mod.ImagesConfig.for_dataset(ds.name, write=flag), dataset=ds, progress=progress)
    status_of = dict(zip(report.per_mention["image"], report.per_mention["status"]))
    files: dict[str, ImageFile] = {}
    lists = mention_image_lists(ds)
    for rels in lists:
        for rel in rels:
            if rel in files:
                continue
            try:
                path = ds.image_path(rel)
            except DataError:  # leads out of the dataset's images: never opened nor hashed
                files[rel] = ImageFile(rel=rel, path=None, status="outside_root")
                continue
            if rel in status_of:
                status = status_of[rel]
            else:
                # Extra images (Richpedia's img_list) are not covered by the mention-image check.
                status = images_mod.load_image(path).status
            files[rel] = ImageFile(rel=rel, path=path, status=status)
    ok = [f for f in files.values() if f.status == "ok"]
    hashes = hash_files([f.path for f in ok], progress=progress)
    for f in ok:
        f.sha256 = hashes.get(f.path)
        if f.sha256 is None:  # vanished between the check and the hash
            f.status = "missing"
    main = ds.mentions["image"].tolist()
    per_mention = pd.DataFrame({
        "mention_id": ds.mentions["mention_id"].astype(str).tolist(),
        "image": [r if _is_path(r) else None for r in main],
        "images": lists,
        "status": [files[r].status if _is_path(r) and r in files else "no_image" for r in main],
    })
    return ImageScan(files=files, per_mention=per_mention)
