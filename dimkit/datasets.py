"""The one prepared form of every dataset, and how to load it (notebook ``00_data``).

A prepared dataset is a folder ``$DIMKIT_DATA/<name>/`` of parquet files readable with plain pandas:

- ``mentions.parquet``: ``mention_id``, ``split`` (train/dev/test), ``sentence``, ``mention``,
  ``image`` (path relative to the dataset folder, or null), ``qid`` (gold, null for NIL), plus
  optional source columns (``entity_name``, ``mention_type``, ...).
- ``entities.parquet``: ``qid``, ``name``, ``description``, ``description_source``, ``images``
  (list of paths relative to the dataset folder), plus ``description_original`` in ``+`` datasets.
- ``candidates.parquet`` once built: ``mention_id``, ``qids`` (ranked list).
- ``meta.json``: source layout, source path, counts; written last, so its presence marks a
  complete dataset.

For WikiDiverse, whose release has no Wikidata ids, ``qid`` holds the entity's Wikipedia title:
it is the KB key, whatever its form.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

import pandas as pd

from . import atomic, paths
from .errors import DataError, DimkitError

SPLITS = ("train", "dev", "test")

MENTION_COLUMNS = ("mention_id", "split", "sentence", "mention", "image", "qid")
ENTITY_COLUMNS = ("qid", "name", "description", "description_source", "images")
CANDIDATE_COLUMNS = ("mention_id", "qids")

#: Names used across the kit. ``+`` marks the LLM-augmented variant of a dataset.
KNOWN_DATASETS = (
    "sample", "sample+",
    "wikimel", "richpediamel", "wikidiverse",
    "wikimel+", "richpediamel+", "wikidiverse+",
)
ALIASES = {
    "wiki+": "wikimel+",
    "rich+": "richpediamel+",
    "diverse+": "wikidiverse+",
    "wiki": "wikimel",
    "rich": "richpediamel",
    "diverse": "wikidiverse",
    "wikimel_plus": "wikimel+",
    "richpediamel_plus": "richpediamel+",
    "wikidiverse_plus": "wikidiverse+",
}
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*\+?$")


def canonical_name(name: str) -> str:
    """Map a dataset name or alias (``rich+``) to its canonical folder name (``richpediamel+``)."""
    if not isinstance(name, str) or not name.strip():
        raise DimkitError(f"dataset name must be a non-empty string, got {name!r}")
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if not _NAME_RE.match(key):
        raise DimkitError(
            f"invalid dataset name {name!r}: use lower-case letters, digits, '_', '-', '.', "
            f"optionally ending in '+' (known: {', '.join(KNOWN_DATASETS)})")
    return key


def base_name(name: str) -> str:
    """The original dataset of a ``+`` variant (``richpediamel+`` -> ``richpediamel``)."""
    key = canonical_name(name)
    return key[:-1] if key.endswith("+") else key


def is_augmented(name: str) -> bool:
    """True for the LLM-augmented ``+`` datasets."""
    return canonical_name(name).endswith("+")


def dataset_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """Folder of the prepared dataset ``name``."""
    root = Path(data_dir) if data_dir is not None else paths.data_dir()
    return root / canonical_name(name)


def check_relative_path(value: str, *, file: str | Path, record: object, field: str) -> str:
    """Validate a dataset-relative path: no absolute paths, no '..' escaping the dataset root."""
    if not isinstance(value, str) or not value:
        raise DataError("expected a non-empty relative path", file=file, record=record, field=field)
    p = PurePosixPath(value.replace("\\", "/"))
    if p.is_absolute() or re.match(r"^[A-Za-z]:", value):
        raise DataError(f"image path {value!r} is absolute; it must stay inside the dataset root",
                        file=file, record=record, field=field)
    if posixpath.normpath(p).split("/")[0] == "..":
        raise DataError(f"image path {value!r} escapes the dataset root", file=file, record=record, field=field)
    return str(p)


@dataclass
class Dataset:
    """A prepared dataset: mentions, entities (the KB), optional candidates and meta."""

    name: str
    root: Path
    mentions: pd.DataFrame
    entities: pd.DataFrame
    meta: dict = field(default_factory=dict)
    _candidates: pd.DataFrame | None = field(default=None, repr=False)
    _real: dict = field(default_factory=dict, repr=False)  # folder -> its resolved path (image_path)

    def __repr__(self) -> str:
        c = self.counts()
        return (f"Dataset({self.name!r}: {c['mentions']} mentions (train {c['mentions_train']}, "
                f"dev {c['mentions_dev']}, test {c['mentions_test']}), {c['entities']} entities, "
                f"root={str(self.root)!r})")

    @property
    def candidates(self) -> pd.DataFrame | None:
        """Ranked candidate lists (``mention_id``, ``qids``), or None if not built yet."""
        if self._candidates is None:
            p = self.root / "candidates.parquet"
            if p.exists():
                self._candidates = read_table(p, CANDIDATE_SCHEMA, self.name)
        return self._candidates

    def split(self, split: str) -> pd.DataFrame:
        """Mentions of one split."""
        if split not in SPLITS:
            raise DimkitError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.mentions[self.mentions["split"] == split].reset_index(drop=True)

    def image_path(self, rel: str | None) -> Path | None:
        """Absolute path of a dataset-relative image path (None stays None); DataError, without
        opening the file, when the path leads out of the dataset's images.

        The path must be relative without escaping '..' (:func:`check_relative_path`) and must
        resolve, symlinks followed, inside the dataset folder or inside the target of the link its
        first folder is (``images -> /data/ImgData``, as prepare and augment make them). A link in the
        image folder that points elsewhere (``evil.jpg -> /etc/passwd``) is refused.
        """
        if rel is None or (isinstance(rel, float) and rel != rel):
            return None
        where = self.root / "mentions.parquet"
        clean = check_relative_path(rel, file=where, record=None, field="image")
        # Plain strings and each folder resolved once per dataset: a check of 25K images would
        # otherwise spend seconds in pathlib; the file itself is followed only when it is a link.
        path = os.path.join(self.root, rel)
        folder, name = os.path.split(path)
        real = os.path.realpath(path) if os.path.islink(path) else os.path.join(self._resolved(folder), name)
        top = clean.split("/", 1)[0] if "/" in clean else None
        allowed = [self._resolved(str(self.root))]
        if top is not None and os.path.islink(os.path.join(self.root, top)):
            allowed.append(self._resolved(os.path.join(self.root, top)))
        if not any(real == base or real.startswith(base + os.sep) for base in allowed):
            folders = " or ".join(allowed)
            raise DataError(f"image path {rel!r} resolves to {real}, outside the dataset's image "
                            f"folder ({folders}); it is not opened (a link in the image folder points "
                            "elsewhere, or the path climbs out of a linked folder with '..'): put the "
                            "file itself in the image folder", file=where, field="image")
        return Path(path)

    def _resolved(self, folder: str) -> str:
        if folder not in self._real:
            self._real[folder] = os.path.realpath(folder)
        return self._real[folder]

    def counts(self) -> dict:
        """Mentions per split, entities, mentions with an image, NIL mentions."""
        return _counts(self.mentions, self.entities)


def _counts(mentions: pd.DataFrame, entities: pd.DataFrame) -> dict:
    out = {f"mentions_{s}": int((mentions["split"] == s).sum()) for s in SPLITS}
    out.update(mentions=len(mentions), entities=len(entities), mentions_with_image=int(mentions["image"].notna().sum()),
               nil_mentions=int(mentions["qid"].isna().sum()))
    return out


#: How to build a bundled dataset the first time it is asked for, by name. :mod:`dimkit.bundled`
#: registers ``sample`` (prepared from the shipped source) and ``sample+`` (its stored oracle answers),
#: so this module never imports the stages that build them.
BUILDERS: dict[str, Callable[[Path | None], object]] = {}


def require(name: str, data_dir: str | Path | None = None) -> str:
    """The canonical name of a dataset that is prepared, building a bundled one on first use; else
    the error :func:`load` would raise, at once (notebooks call it right after their parameters)."""
    key = canonical_name(name)
    root = dataset_dir(key, data_dir)
    if (root / "meta.json").exists():
        # A user's dataset whose release moved still loads: `dimkit images` names the moved folder as the
        # cause. The bundled sample links into the package, so a moved checkout is repaired by rebuilding.
        if key not in BUILDERS or not _images_link_broken(root):
            return key
        for base in (key[:-1],) if key.endswith("+") and key[:-1] in BUILDERS else ():
            require(base, data_dir)
        if not _images_link_broken(root):
            return key
    if key in BUILDERS:
        BUILDERS[key](Path(data_dir) if data_dir is not None else None)
        return key
    raise DimkitError(f"dataset {key!r} is not prepared: {root / 'meta.json'} is missing. {how_to_prepare(key)}.")


def how_to_prepare(name: str) -> str:
    """The command that makes the dataset ``name`` (canonical) prepared here, as a sentence without its
    final stop: ``dimkit augment`` for a '+' dataset (or a released one prepared), else ``dimkit prepare``."""
    if name.endswith("+"):
        return (f"Build it with `dimkit augment {name[:-1]} --out {name}`, or prepare a released '+' dataset "
                f"with `dimkit prepare SRC --name {name}`")
    return f"Prepare it with `dimkit prepare SRC --name {name}`"


def kb_hashes(entities: pd.DataFrame, column: str = "description") -> dict[str, str]:
    """What a trained run records of the knowledge base it was trained on: the hash of the entities'
    qids in order (``entity_qids_sha256``), and of their qids, names and ``column`` texts
    (``entity_texts_sha256``), so a run on descriptions rewritten since is told apart."""
    from .store import content_hash

    qids = entities["qid"].astype(str).tolist()
    texts = entities[column] if column in entities.columns else pd.Series([None] * len(entities))
    rows = [[q, str(n), t if isinstance(t, str) else None]
            for q, n, t in zip(qids, entities["name"].tolist(), texts.tolist())]
    return {"entity_qids_sha256": content_hash(qids), "entity_texts_sha256": content_hash(rows)}


def _images_link_broken(root: Path) -> bool:
    """Whether the dataset's ``images`` is a symlink to nothing (its target moved or was deleted)."""
    link = root / "images"
    return link.is_symlink() and not link.exists()


def load(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load the prepared dataset ``name`` (a bundled one is built on first use)."""
    key = require(name, data_dir)
    root = dataset_dir(key, data_dir)
    meta = read_json_file(root / "meta.json", what="the dataset's meta.json",
                          fix=f"prepare it again with `dimkit prepare SRC --name {key}`")
    mentions = read_table(root / "mentions.parquet", MENTION_SCHEMA, key)
    entities = read_table(root / "entities.parquet", ENTITY_SCHEMA, key)
    _check_splits(mentions, root / "mentions.parquet")
    return Dataset(name=key, root=root, mentions=mentions, entities=entities, meta=meta)


#: Column -> what its values must be, checked on every load (``text``: strings; ``text?``: strings
#: or null; ``list``: a list of strings per row). Optional columns are not listed.
MENTION_SCHEMA = {"mention_id": "text", "split": "text", "sentence": "text", "mention": "text",
                  "image": "text?", "qid": "text?"}
ENTITY_SCHEMA = {"qid": "text", "name": "text", "description": "text?", "description_source": "text?",
                 "images": "list"}
CANDIDATE_SCHEMA = {"mention_id": "text", "qids": "list"}
_TEXT_KINDS = ("string", "empty")


def read_table(path: Path, schema: dict[str, str], dataset: str) -> pd.DataFrame:
    """Read one parquet file of a prepared dataset and check its columns and their types.

    A damaged file, a missing column or a column of the wrong type raises :class:`DataError`
    naming the file and the column, instead of a ``KeyError`` somewhere downstream.
    """
    fix = f"prepare it again (`dimkit prepare SRC --name {dataset}`)"
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError:
        raise DataError(f"file missing from the prepared dataset; {fix}", file=path) from None
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"not a readable parquet file ({type(exc).__name__}: {str(exc)[:200]}); {fix}",
                        file=path) from None
    for col, kind in schema.items():
        if col not in df.columns:
            raise DataError(f"missing column (has: {', '.join(map(str, df.columns))}); {fix}", file=path,
                            field=col)
        values = df[col]
        if kind == "list":
            bad = [i for i, v in enumerate(values.tolist())
                   if isinstance(v, str) or not (v is None or hasattr(v, "__len__") or v != v)]
            if bad:
                raise DataError(f"expected a list per row, got {type(values.iloc[bad[0]]).__name__}; {fix}",
                                file=path, record=_row_id(df, bad[0]), field=col)
            continue
        inferred = pd.api.types.infer_dtype(values, skipna=True)
        if inferred not in _TEXT_KINDS:
            raise DataError(f"expected text, the column holds {inferred} values; {fix}", file=path, field=col)
        if kind == "text" and values.isna().any():
            row = _row_id(df, int(values.isna().to_numpy().argmax()))
            raise DataError(f"missing value; {fix}", file=path, record=row, field=col)
    return df


def _row_id(df: pd.DataFrame, i: int) -> object:
    for col in ("mention_id", "qid"):
        if col in df.columns and isinstance(df[col].iloc[i], str):
            return df[col].iloc[i]
    return f"row {i}"


def read_json_file(path: Path, *, what: str, fix: str) -> dict:
    """A JSON object file kit code wrote (meta.json, reports): damaged or missing -> DataError with the fix."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise DataError(f"{what} is missing; {fix}", file=path) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"{what} is damaged ({type(exc).__name__}: {str(exc)[:120]}); {fix}", file=path) from None
    if not isinstance(data, dict):
        raise DataError(f"{what} is not a JSON object; {fix}", file=path)
    return data


def _check_splits(mentions: pd.DataFrame, file: str | Path) -> None:
    bad = ~mentions["split"].isin(SPLITS)
    if bad.any():
        row = mentions[bad].iloc[0]
        raise DataError(f"split {row['split']!r} is not one of {SPLITS}", file=file, record=row["mention_id"],
                        field="split")


def validate(mentions: pd.DataFrame, entities: pd.DataFrame, *, source: str | Path = "<dataset>",
             candidates: pd.DataFrame | None = None) -> None:
    """Check the prepared form; raise DataError naming the table, record and field."""
    mfile, efile = f"{source}: mentions", f"{source}: entities"
    for table, columns, file in ((mentions, MENTION_COLUMNS, mfile), (entities, ENTITY_COLUMNS, efile)):
        for col in columns:
            if col not in table.columns:
                raise DataError("missing column", file=file, field=col)
    qids, ids = entities["qid"], mentions["mention_id"]
    if qids.duplicated().any():
        raise DataError("duplicate entity id", file=efile, record=qids[qids.duplicated()].iloc[0], field="qid")
    if qids.isna().any():
        raise DataError("entity without id", file=efile, record=int(qids.isna().idxmax()), field="qid")
    if ids.duplicated().any():
        raise DataError("duplicate mention id", file=mfile, record=ids[ids.duplicated()].iloc[0], field="mention_id")
    _check_splits(mentions, mfile)
    missing = mentions["qid"].notna() & ~mentions["qid"].isin(set(qids))
    if missing.any():
        row = mentions[missing].iloc[0]
        raise DataError(f"answer {row['qid']!r} is not in the knowledge base ({int(missing.sum())} such mention(s))",
                        file=mfile, record=row["mention_id"], field="qid")
    for col in ("sentence", "mention"):
        if mentions[col].isna().any():
            raise DataError("missing value", file=mfile, record=ids[mentions[col].isna().idxmax()], field=col)
    for mid, img in zip(ids, mentions["image"]):
        if img is not None and img == img:
            check_relative_path(img, file=mfile, record=mid, field="image")
    if candidates is not None:
        unknown = ~candidates["mention_id"].isin(set(ids))
        if unknown.any():
            raise DataError("candidate list for an unknown mention", file=f"{source}: candidates",
                            record=candidates.loc[unknown.idxmax(), "mention_id"], field="mention_id")


def _normalise(mentions: pd.DataFrame, entities: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    mentions = mentions.copy()
    entities = entities.copy()
    for col in ("mention_id", "split", "sentence", "mention"):
        mentions[col] = mentions[col].astype(str)
    for col in ("image", "qid"):
        mentions[col] = mentions[col].astype(object).where(mentions[col].notna(), None)
    entities["qid"] = entities["qid"].astype(str)
    entities["name"] = entities["name"].astype(str)
    entities["description"] = entities["description"].astype(object).where(
        entities["description"].notna(), None)
    entities["images"] = [list(x) if x is not None and not (isinstance(x, float)) else []
                          for x in entities["images"]]
    return mentions.reset_index(drop=True), entities.reset_index(drop=True)


def _candidate_table(candidates: pd.DataFrame) -> pd.DataFrame:
    out = candidates[list(CANDIDATE_COLUMNS)].copy()
    out["qids"] = [list(map(str, q)) for q in out["qids"]]
    return out


def write_candidates(root: Path, candidates: pd.DataFrame) -> Path:
    """Write ``candidates.parquet`` atomically into a prepared dataset folder."""
    return atomic.write_parquet(_candidate_table(candidates), Path(root) / "candidates.parquet")


def write_prepared(root: str | Path, mentions: pd.DataFrame, entities: pd.DataFrame, meta: dict,
                   candidates: pd.DataFrame | None = None, *, source: str | Path = "<dataset>") -> Path:
    """Validate and write a prepared dataset; on any failure nothing new is left behind.

    Every file is serialised before the folder is touched, then written atomically; ``meta.json``
    goes last, so a dataset without it is incomplete and :func:`load` refuses it.
    """
    root = Path(root)
    mentions, entities = _normalise(mentions, entities)
    validate(mentions, entities, source=source, candidates=candidates)
    meta = {**meta, "counts": {**meta.get("counts", {}), **_counts(mentions, entities)}}
    tables = {"mentions": mentions, "entities": entities}
    if candidates is not None:
        tables["candidates"] = _candidate_table(candidates)
    files = {f"{name}.parquet": table.to_parquet(index=False) for name, table in tables.items()}
    files["meta.json"] = (json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n").encode()
    created = not root.exists()
    try:
        # An older meta.json must not vouch for a mixture of old and new files while they are replaced.
        (root / "meta.json").unlink(missing_ok=True)
        if candidates is None:
            (root / "candidates.parquet").unlink(missing_ok=True)
        for name, data in files.items():  # meta.json last
            atomic.write_bytes(data, root / name)
    except BaseException:
        if created:
            atomic.remove(root)
        raise
    return root
