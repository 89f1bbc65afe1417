"""Convert a released dataset into dimkit's prepared form (notebook ``00_data``).

``dimkit prepare SRC --name NAME`` reads one of three source layouts and writes ``$DIMKIT_DATA/NAME``
through :func:`dimkit.datasets.write_prepared`:

- ``dim``: the DIM release (github.com/season1blue/DIM): ``SRC`` is the data root holding ``wikipedia/``,
  ``richpedia/`` or ``wikidiverse/`` beside ``ImgData/``, or one of those dataset folders.
- ``mimic``: the MIMIC "cleaned" layout (github.com/pengfei-luo/MIMIC): ``kb_entity.json``, ``qid2id.json``,
  ``<PREFIX>_{train,dev,test}.json``, ``kb_image/``, ``mention_image/``.
- ``melbench``: the raw MELBench files (github.com/seukgcode/MELBench): ``SRC`` is ``Wikidata-MEL.json`` or
  ``Richpedia-MEL.json``; no images; a seeded 70/10/20 split over sentences.

Bad input raises :class:`dimkit.errors.DataError` naming the file, the record and the field before
anything is written; a failed write leaves the previous output as it was. A rerun on the same source
replaces (or, unchanged, keeps) its earlier output; a name that holds a dataset made from another source
or by another stage (a '+' dataset of ``dimkit augment``) is refused unless ``force``. Images are referenced,
never opened (:mod:`dimkit.images` checks them); ``meta.json`` counts the referenced files that do
not exist and those a link takes outside the images root, which are never copied.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar, Iterable
from urllib.parse import unquote

import pandas as pd
from tqdm.auto import tqdm

from . import atomic, datasets, paths
from .errors import ConfigError, DataError, DimkitError, option
from .stage import Config, Result, setting
from .store import content_hash

LAYOUTS = ("dim", "mimic", "melbench")
#: Folder names of the DIM release, file prefixes of MIMIC, file stems of MELBench, per dataset family.
DIM_FOLDERS = {"wikimel": "wikipedia", "richpediamel": "richpedia", "wikidiverse": "wikidiverse"}
MIMIC_PREFIXES = {"wikimel": "WIKIMEL", "richpediamel": "RichpediaMEL", "wikidiverse": "wiki_diverse"}
MELBENCH_STEMS = {"wikimel": "Wikidata-MEL", "richpediamel": "Richpedia-MEL"}
_FAMILY_ALIASES = {
    "wikimel": "wikimel", "wiki": "wikimel", "wikipedia": "wikimel", "wikidata": "wikimel",
    "wikidatamel": "wikimel",
    "richpediamel": "richpediamel", "rich": "richpediamel", "richpedia": "richpediamel",
    "wikidiverse": "wikidiverse", "diverse": "wikidiverse",
}
#: DIM's ``dataset.py`` remaps this one answer glitch of the WikiMEL release.
ANSWER_GLITCHES = {"c": "Q5729149"}
NIL_ANSWERS = {"", "nil"}
#: The seed of the released scripts (``args.py``); used for every split dimkit has to make.
DEFAULT_SEED = 114514
MELBENCH_FRACTIONS = (0.7, 0.1, 0.2)
DEV_CARVE_FRACTION = 0.1
_SEP = "[SEP]. "
_DIM_SPLIT_FILES = {"train.json", "test.json", "dev.json", "valid.json"}


# --------------------------------------------------------------------------------------------
# small readers


class _DupDict(dict):
    """A JSON object that repeated a key (json.load would silently keep the last value)."""

    dup: str


def _read_json(path: Path, expect: type | None = None, what: str = "", *, key_field: str = "key") -> Any:
    """Load a JSON file (of type ``expect``, holding ``what``); a missing file, bad encoding, malformed
    JSON and a repeated key raise. A leading UTF-8 byte order mark (as Windows editors write) is skipped."""
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", file=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=path) from None
    repeated: list[bool] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out = dict(pairs)
        if len(out) < len(pairs):
            keys = [k for k, _ in pairs]
            out = _DupDict(out)
            out.dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            repeated.append(True)
        return out

    try:
        data = json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", file=path) from None
    if isinstance(data, _DupDict):
        raise DataError("duplicate key: the JSON object repeats it (json would keep the last)",
                        file=path, record=data.dup, field=key_field)
    if repeated:  # which record repeats a field (a walk over the whole file, so only when one does)
        items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
        for key, value in items:
            dup = _repeated_key(value)
            if dup is not None:
                raise DataError("duplicate field in one record", file=path, record=key, field=dup)
    return data if expect is None else _expect(data, expect, path, what)


def _repeated_key(obj: Any) -> str | None:
    """The repeated key of the first JSON object inside ``obj`` that repeats one."""
    if isinstance(obj, _DupDict):
        return obj.dup
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return next((dup for dup in map(_repeated_key, children) if dup is not None), None)


def _expect(data: Any, kind: type, path: Path, what: str) -> Any:
    if not isinstance(data, kind):
        raise DataError(f"expected a JSON {'object' if kind is dict else 'list'} ({what}), got a "
                        f"{type(data).__name__}", file=path)
    return data


def _record(value: Any, path: Path, key: object) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"expected an object, got a {type(value).__name__}", file=path, record=key)
    return value


def _need(rec: dict, name: str, path: Path, key: object, types: tuple = (str,), allow_none: bool = False) -> Any:
    """A required field of a record, of one of ``types``."""
    if name not in rec:
        raise DataError("required field is missing", file=path, record=key, field=name)
    value = rec[name]
    if value is None and allow_none:
        return None
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        want = " or ".join(t.__name__ for t in types)
        raise DataError(f"expected {want}, got {type(value).__name__} {value!r:.60}", file=path, record=key,
                        field=name)
    return value


def _hash_order(keys: Iterable[object], seed: int) -> list:
    """Keys in a seeded order that does not depend on Python's RNG, platform or input order."""
    return sorted(keys, key=lambda k: (hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(), str(k)))


def seeded_split(keys: Iterable[object], seed: int = DEFAULT_SEED,
                 fractions: tuple[float, float, float] = MELBENCH_FRACTIONS) -> dict:
    """Assign each key to train/dev/test in the given proportions, deterministically by seed."""
    order = _hash_order(list(keys), seed)
    n_train = int(round(len(order) * fractions[0]))
    n_dev = min(len(order) - n_train, int(round(len(order) * fractions[1])))
    return {k: "train" if i < n_train else "dev" if i < n_train + n_dev else "test" for i, k in enumerate(order)}


def _kb_keys(keys: list, path: Path, field: str, noun: str) -> list[str]:
    """The KB keys in the order DIM's features follow: distinct non-empty strings."""
    seen: dict[str, int] = {}
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key:
            raise DataError(f"expected {noun}, got {key!r:.60}", file=path, record=i, field=field)
        if key in seen:
            raise DataError(f"duplicate {field} (also at position {seen[key]})", file=path, record=key, field=field)
        seen[key] = i
    return keys


def _parse_briefs(table: dict, path: Path, field: str) -> tuple[dict, dict, int]:
    """Descriptions and names of released ``"<name> [SEP]. <desc>"`` texts, and how many were 'None'.

    The released code keeps the text after the last ``[SEP]. `` and encodes the literal ``None`` for
    an entity without a brief, which becomes no description here.
    """
    descs: dict[str, str | None] = {}
    names: dict[str, str] = {}
    none_literal = 0
    for key, text in table.items():
        if text is None:
            descs[key] = None
            continue
        if not isinstance(text, str):
            raise DataError(f"expected a string, got {type(text).__name__}", file=path, record=key, field=field)
        if _SEP in text:
            names[key] = text.split(_SEP, 1)[0].strip()
            text = text.rsplit(_SEP, 1)[1]
        desc = text.strip()
        if desc == "None":
            none_literal += 1
        descs[key] = desc if desc not in ("", "None") else None
    return descs, {k: v for k, v in names.items() if v}, none_literal


# --------------------------------------------------------------------------------------------
# what a reader hands back


@dataclass
class _Read:
    """A source read into memory: image paths still relative to ``images_root``."""

    mentions: pd.DataFrame
    entities: pd.DataFrame
    candidates: pd.DataFrame | None
    images_root: Path | None
    meta: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _mention_frame(rows: list[dict], *extra: str) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*datasets.MENTION_COLUMNS, *extra])


def _entity_frame(rows: list[dict], plus: bool) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*datasets.ENTITY_COLUMNS, *(["description_original"] if plus else [])])


def _entities(kb_list: list[str], names: dict, descs: dict, original: dict | None) -> pd.DataFrame:
    """The KB table of a DIM release; ``original``: a '+' dataset's description_original, else None."""
    label = "llm (released)" if original is not None else "wikipedia (released)"
    rows = []
    for key in kb_list:
        desc = descs.get(key)
        row = {"qid": key, "name": names.get(key) or key, "description": desc,
               "description_source": label if desc else "none", "images": []}
        if original is not None:
            row["description_original"] = original.get(key)
        rows.append(row)
    return _entity_frame(rows, original is not None)


def _descriptions(tables: list[tuple[dict | None, Path, str]], field: str, plus: bool, reader: dict,
                  notes: list[str]) -> tuple[dict, dict, dict | None]:
    """Descriptions, names and (``plus``) description_original of a DIM release's KB.

    ``tables``: (table or None, file, label) in order of preference; descriptions come from the first
    table present, a '+' dataset's originals from the next one.
    """
    present = [t for t in tables if t[0] is not None]
    descs, names, none_literal = {}, {}, 0
    reader["descriptions_from"] = present[0][2] if present else None
    if present:
        descs, names, none_literal = _parse_briefs(present[0][0], present[0][1], field)
    else:
        notes.append(f"no {' or '.join(t[2] for t in tables)}: entities have no description")
    original = None
    if plus:
        original, reader["description_original_from"] = {}, None
        if len(present) > 1:
            original, more_names, n = _parse_briefs(present[1][0], present[1][1], field)
            names = {**more_names, **names}
            none_literal += n
            reader["description_original_from"] = present[1][2]
        else:
            notes.append(f"'+' dataset without {' or '.join(t[2] for t in tables[1:])}: description_original "
                         "is empty")
    if none_literal:
        notes.append(f"{none_literal} description(s) were the literal text 'None' (entity without a "
                     "brief); stored as no description (the released code encodes the word 'None')")
    return descs, names, original


# --------------------------------------------------------------------------------------------
# layout detection


def _family(subset: str | None) -> str | None:
    return None if subset is None else _FAMILY_ALIASES.get(re.sub(r"[^a-z]", "", subset.lower()))


def _mimic_prefixes(folder: Path) -> list[str]:
    pat = re.compile(r"^(.+)_(train|dev|test)\.json$")
    return sorted({m.group(1) for p in folder.iterdir() if (m := pat.match(p.name))})


def _sniff_dim_subset(folder: Path) -> str | None:
    """Tell wikipedia / richpedia / wikidiverse apart from the records of the folder's first split file."""
    data = _read_json(next(folder / f for f in ("train.json", "test.json", "dev.json", "valid.json")
                           if (folder / f).exists()))
    if isinstance(data, list):
        return "wikidiverse"
    if isinstance(data, dict):
        for rec in list(data.values())[:200]:
            if isinstance(rec, dict) and "imgPath" in rec:
                return "wikipedia"
            if isinstance(rec, dict) and "img_list" in rec:
                return "richpedia"
    return None


def _sniff_melbench(path: Path) -> str | None:
    data = _read_json(path)
    if isinstance(data, dict):
        for rec in list(data.values())[:200]:
            if isinstance(rec, dict) and "mentions" in rec:
                return MELBENCH_STEMS["wikimel" if isinstance(rec["mentions"], list) else "richpediamel"]
    return None


def detect_layout(src: str | Path) -> tuple[str, str | None]:
    """Guess the layout of ``src`` -> (layout, subset); subset is the source's own name for it
    (DIM folder ``wikipedia``, MIMIC prefix ``WIKIMEL``, MELBench stem ``Wikidata-MEL``) or None
    when the source holds several and the caller must choose."""
    src = Path(src)
    if not src.exists():
        raise DataError("source not found", file=src)
    if src.is_file():
        if src.suffix.lower() != ".json":
            raise DataError("a source file must be a MELBench .json file (Wikidata-MEL.json or "
                            "Richpedia-MEL.json); other layouts are folders", file=src)
        fam = _family(src.stem)
        return "melbench", MELBENCH_STEMS[fam] if fam in MELBENCH_STEMS else _sniff_melbench(src)
    if {p.name for p in src.iterdir()} & _DIM_SPLIT_FILES:
        return "dim", src.name if src.name in DIM_FOLDERS.values() else _sniff_dim_subset(src)
    prefixes = _mimic_prefixes(src)
    if (src / "kb_entity.json").exists() or prefixes:
        return "mimic", prefixes[0] if len(prefixes) == 1 else None
    found = [d for d in DIM_FOLDERS.values()
             if (src / d).is_dir() and any((src / d / f).is_file() for f in _DIM_SPLIT_FILES)]
    if found:
        return "dim", found[0] if len(found) == 1 else None
    raise DataError(
        "cannot tell the layout: expected a DIM data root (wikipedia/, richpedia/ or wikidiverse/ "
        "beside ImgData/), a DIM dataset folder (train.json, test.json ...), a MIMIC folder "
        "(kb_entity.json, qid2id.json, <PREFIX>_train.json ...) or a MELBench .json file", file=src)


def _resolve_subset(layout: str, src: Path, detected: str | None, subset: str | None, name: str) -> str:
    """The source-specific subset: explicit option, else detected, else the dataset name's family."""
    if layout == "dim":
        mapping = DIM_FOLDERS
        if src.is_dir() and {p.name for p in src.iterdir()} & _DIM_SPLIT_FILES:
            choices = list(DIM_FOLDERS.values())  # a dataset folder: any reader flavour applies
        else:
            choices = [d for d in DIM_FOLDERS.values() if (src / d).is_dir()]
    elif layout == "mimic":
        mapping, choices = MIMIC_PREFIXES, _mimic_prefixes(src) if src.is_dir() else []
    else:
        mapping, choices = MELBENCH_STEMS, list(MELBENCH_STEMS.values())

    def pick(fam: str | None) -> str | None:
        return next((c for c in choices if fam in mapping and c.lower() == mapping[fam].lower()), None)

    if subset is not None:
        got = next((c for c in choices if c.lower() == subset.lower()), None) or pick(_family(subset))
        if got is None:
            raise DimkitError(f"unknown subset {subset!r} for layout {layout!r} in {src}; choose "
                              f"from {', '.join(choices) or '(none found)'}")
        return got
    got = detected or pick(_family(datasets.base_name(name)))
    if got is not None:
        return got
    if layout == "mimic" and not choices:
        raise DataError("file not found: no <PREFIX>_train.json / _dev.json / _test.json split "
                        "files in the MIMIC folder", file=src / "<PREFIX>_train.json")
    named = option("dataset='wikimel'", "--name wikimel")
    raise DimkitError(f"cannot tell which dataset {src} holds (found: {', '.join(choices)}); pick "
                      f"one with {option('subset=...', '--subset')}, or name the dataset after it (e.g. {named})")


# --------------------------------------------------------------------------------------------
# DIM release layout


def _read_dim(src: Path, subset: str, name: str, images: Path | None, seed: int) -> _Read:
    if (src / subset).is_dir() and not (src / "train.json").exists():  # a data root
        folder, images_root = src / subset, src / "ImgData"
    else:  # a dataset folder
        folder = src
        images_root = src / "ImgData" if (src / "ImgData").is_dir() else src.parent / "ImgData"
    notes = []
    files = [("train", folder / "train.json")]
    if (folder / "dev.json").is_file():
        files.append(("dev", folder / "dev.json"))
        if (folder / "valid.json").is_file():
            notes.append("both dev.json and valid.json exist; dev.json was used")
    elif (folder / "valid.json").is_file():
        files.append(("dev", folder / "valid.json"))
        notes.append("valid.json read as the dev split")
    files.append(("test", folder / "test.json"))
    for _, p in files:
        if not p.is_file():
            raise DataError("file not found (a DIM dataset folder needs train.json and test.json)", file=p)
    plus = datasets.is_augmented(name)
    reader = _read_dim_diverse if subset == "wikidiverse" else _read_dim_wiki_rich
    out = reader(folder, subset, files, plus)
    out.images_root = images if images is not None else images_root
    out.meta["dataset_folder"] = str(folder)
    out.meta["reader"]["descriptions"] = int(out.entities["description"].notna().sum())
    released = "llm (released)" if plus else "wikipedia (released)"
    out.meta["description_source"] = released if out.meta["reader"]["descriptions_from"] else "none"
    m = out.mentions
    if all(split != "dev" for split, _ in files):
        # The Richpedia release has no dev.json: a seeded 10% of train becomes dev.
        train = m["split"] == "train"
        keys = m.loc[train, "_key"].tolist()
        n_dev = max(1, int(round(len(keys) * DEV_CARVE_FRACTION))) if len(keys) >= 2 else 0
        m.loc[train & m["_key"].isin(_hash_order(keys, seed)[:n_dev]), "split"] = "dev"
        out.meta["reader"]["dev_carved_from_train"] = n_dev
        notes.append(f"no dev.json: {n_dev} of {len(keys)} train.json records ({DEV_CARVE_FRACTION:.0%}, "
                     f"seeded hash order, seed {seed}) were moved to dev; their mention_id keeps the 'train-' prefix")
    out.notes[:0] = notes
    cand_path = folder / "search_top100.json"
    if cand_path.is_file():
        out.candidates, out.meta["candidates"] = _released_candidates(out, cand_path, subset == "wikidiverse")
    return out


def _released_candidates(read: _Read, path: Path, by_gold: bool) -> tuple[pd.DataFrame, dict]:
    """DIM's ``search_top100.json`` lists (keyed by mention text, or by the gold entity for WikiDiverse)
    on mention ids; qids outside the KB are dropped and counted, the gold is not inserted."""
    lists = _read_json(path, dict, "key -> list of candidates")
    for key, value in lists.items():
        if not isinstance(value, list) or not all(isinstance(q, str) for q in value):
            raise DataError("expected a list of strings", file=path, record=key, field="candidates")
    kb = set(read.entities["qid"])
    by = "qid" if by_gold else "mention"
    rows, unknown = [], set()
    for mid, key in zip(read.mentions["mention_id"], read.mentions[by]):
        if key in lists:
            rows.append({"mention_id": mid, "qids": [q for q in lists[key] if q in kb]})
            unknown.update(q for q in lists[key] if q not in kb)
    meta = {"file": path.name, "source": "release", "keyed_by": by, "mentions_with_list": len(rows),
            "mentions_without_list": len(read.mentions) - len(rows), "unknown_qids_dropped": len(unknown),
            "max_len": max((len(r["qids"]) for r in rows), default=0)}
    if by_gold:
        meta["note"] = ("label leakage: the released lists are keyed by the GOLD entity (the "
                        "sample's WikiDiverse cands + random same-type entities); DIM evaluates "
                        "[gold] + list truncated to 80. Stored as released, gold not inserted.")
        read.notes.append("candidates.parquet imported from search_top100.json, which is keyed by the "
                          "gold entity (label leakage)")
    else:
        meta["note"] = ("DIM's fuzzy top-100 lists, keyed by mention text; the gold is not "
                        "inserted (DIM ranks over the list plus the gold)")
    return pd.DataFrame(rows, columns=list(datasets.CANDIDATE_COLUMNS)), meta


def _read_dim_wiki_rich(folder: Path, subset: str, files: list[tuple[str, Path]], plus: bool) -> _Read:
    rich = subset == "richpedia"
    notes: list[str] = []
    reader: dict[str, Any] = {"answer_glitches_remapped": 0, "nil_skipped": 0}
    # ---- the KB: qids_ordered.json (the index DIM's features are aligned to), else brief.json
    brief_path, fact_path, kb_path = folder / "brief.json", folder / "fact.json", folder / "qids_ordered.json"
    brief = _read_json(brief_path, dict, "qid -> brief", key_field="qid") if brief_path.is_file() else None
    if brief is None and plus:
        raise DataError("file not found (a '+' dataset's LLM descriptions live in brief.json)", file=brief_path)
    if kb_path.is_file():
        raw = _read_json(kb_path, key_field="qid")
        raw = list(raw) if isinstance(raw, dict) else _expect(raw, list, kb_path, "sorted qids")
        kb_list, kb_source = _kb_keys(raw, kb_path, "qid", "a qid string"), kb_path.name
    elif brief is not None:
        kb_list, kb_source = list(brief), brief_path.name
    else:
        raise DataError("file not found (the KB comes from qids_ordered.json, or brief.json)", file=kb_path)
    kb = set(kb_list)
    # ---- mentions
    rows: list[dict] = []
    gold_names: dict[str, str] = {}
    record_briefs: dict[str, str] = {}
    non_jpg = 0
    key_file: dict[str, Path] = {}  # record key -> the split file that holds it
    for split, path in files:
        for key, value in _read_json(path, dict, "sample key -> record").items():
            if key in key_file:  # the key is the sample's id: one mention in two splits
                raise DataError(f"the same record key is also in {key_file[key]}: one mention in two splits "
                                "leaks evaluation data into training or model selection; keep the record in one "
                                "split file only",
                                file=path, record=key, field="key")
            key_file[key] = path
            rec = _record(value, path, key)
            sentence = _need(rec, "sentence", path, key)
            mention = _need(rec, "mentions", path, key)
            answer = _need(rec, "answer", path, key, allow_none=True)
            image = None
            images: list[str] = []
            if rich:
                lst = rec.get("img_list")
                if lst is not None and not isinstance(lst, list):
                    raise DataError(f"expected a list, got {type(lst).__name__}", file=path, record=key,
                                    field="img_list")
                for item in lst or []:
                    if not isinstance(item, str):
                        raise DataError(f"expected a file name, got {item!r:.60}", file=path, record=key,
                                        field="img_list")
                    if item.rsplit(".", 1)[-1].lower() != "jpg":  # prepare_richpedia.py keeps only .jpg files
                        non_jpg += 1
                        continue
                    rel = datasets.check_relative_path(item, file=path, record=key, field="img_list")
                    images.append(f"richpedia/images/{rel}")
                image = images[0] if images else None
            else:
                img = _need(rec, "imgPath", path, key, allow_none=True)
                image = datasets.check_relative_path(img, file=path, record=key, field="imgPath") if img else None
            if answer is None or answer.strip().lower() in NIL_ANSWERS:
                reader["nil_skipped"] += 1
                continue
            if answer not in kb and answer in ANSWER_GLITCHES:
                answer = ANSWER_GLITCHES[answer]
                reader["answer_glitches_remapped"] += 1
            if answer not in kb:
                raise DataError(f"answer {answer!r} is not in the knowledge base ({kb_source})",
                                file=path, record=key, field="answer")
            ent_name = rec.get("entities") if isinstance(rec.get("entities"), str) and rec["entities"] else None
            if ent_name:
                gold_names.setdefault(answer, ent_name)
            if isinstance(rec.get("brief"), str):
                record_briefs.setdefault(answer, rec["brief"])
            row = {"mention_id": f"{split}-{key}", "split": split, "sentence": sentence, "mention": mention,
                   "image": image, "qid": answer, "entity_name": ent_name, "_key": key}
            if rich:
                row["images"] = images
            rows.append(row)
    if reader["answer_glitches_remapped"]:
        notes.append(f"{reader['answer_glitches_remapped']} answer(s) 'c' remapped to Q5729149 "
                     "(the release's glitch, remapped the same way in DIM's dataset.py)")
    if reader["nil_skipped"]:
        notes.append(f"{reader['nil_skipped']} record(s) without an answer (NIL) skipped; "
                     "the released code cannot use them")
    if non_jpg:
        reader["non_jpg_images_dropped"] = non_jpg
        notes.append(f"{non_jpg} non-.jpg file(s) in img_list dropped, as prepare_richpedia.py does")
    # ---- entities: names (ne2qid.json, else the records, else the briefs) and descriptions
    ne_names: dict[str, str] = {}
    ne_path = folder / "ne2qid.json"
    if ne_path.is_file():
        for ent, q in _read_json(ne_path, dict, "entity name -> qid", key_field="name").items():
            if not isinstance(q, str):
                raise DataError(f"expected a qid string, got {q!r:.60}", file=ne_path, record=ent, field="qid")
            ne_names.setdefault(q, ent)
    fact = _read_json(fact_path, dict, "qid -> fact", key_field="qid") if fact_path.is_file() else None
    tables = [(brief, brief_path, brief_path.name), (fact, fact_path, fact_path.name),
              (record_briefs or None, files[0][1], "records' brief field")]
    descs, brief_names, original = _descriptions(tables, "brief", plus, reader, notes)
    if brief is not None and len(set(brief) - kb):
        notes.append(f"{len(set(brief) - kb)} brief.json entr(y/ies) not in {kb_source} ignored")
    names = {**brief_names, **gold_names, **{q: n for q, n in ne_names.items() if n}}
    reader["kb_from"] = kb_source
    mentions = _mention_frame(rows, "entity_name", *(["images"] if rich else []), "_key")
    return _Read(mentions, _entities(kb_list, names, descs, original), None, None, {"reader": reader}, notes)


def _read_dim_diverse(folder: Path, subset: str, files: list[tuple[str, Path]], plus: bool) -> _Read:
    notes: list[str] = []
    reader: dict[str, Any] = {"nil_skipped": 0}
    # ---- the KB (titles): entity_list.json, else brief.json, else entity2desc.json, else the gold
    brief_path, e2d_path, list_path = folder / "brief.json", folder / "entity2desc.json", folder / "entity_list.json"
    brief = _read_json(brief_path, dict, "title -> brief", key_field="entity") if brief_path.is_file() else None
    e2d = _read_json(e2d_path, dict, "title -> description", key_field="entity") if e2d_path.is_file() else None
    if plus and brief is None:
        raise DataError("file not found (a '+' dataset's LLM descriptions live in brief.json)", file=brief_path)
    kb_list: list[str] | None = None
    if list_path.is_file():
        raw = _read_json(list_path, list, "entity titles in feature order")
        kb_list, kb_source = _kb_keys(raw, list_path, "entity", "an entity title"), list_path.name
    elif brief is not None:
        kb_list, kb_source = list(brief), brief_path.name
    elif e2d is not None:
        kb_list, kb_source = list(e2d), e2d_path.name
    else:
        kb_source = "gold entities of the split files"
    kb = set(kb_list) if kb_list is not None else None
    rows: list[dict] = []
    for split, path in files:
        for i, value in enumerate(_read_json(path, list, "WikiDiverse records")):
            rec = _record(value, path, i)
            sentence = _need(rec, "sentence", path, i)
            mention = _need(rec, "mention", path, i)
            entity = _need(rec, "entity", path, i, allow_none=True)
            img = _need(rec, "mention_image", path, i, allow_none=True)
            image = datasets.check_relative_path(img, file=path, record=i, field="mention_image") if img else None
            if entity is None or entity.strip().lower() in NIL_ANSWERS:
                reader["nil_skipped"] += 1
                continue
            if kb is not None and entity not in kb:
                raise DataError(f"answer {entity!r} is not in the knowledge base ({kb_source})",
                                file=path, record=i, field="entity")
            rows.append({
                "mention_id": f"{split}-{i}", "split": split, "sentence": sentence,
                "mention": mention, "image": f"wikidiverse/{image}" if image else None,
                "qid": entity, "entity_name": entity,
                "mention_type": rec.get("mention_type"), "topic": rec.get("topic"),
                "start": rec.get("start"), "end": rec.get("end"), "_key": i})
    if kb_list is None:
        kb_list = sorted({r["qid"] for r in rows})
        notes.append("no entity_list.json, brief.json or entity2desc.json: the KB is the set of gold entities")
    if reader["nil_skipped"]:
        notes.append(f"{reader['nil_skipped']} record(s) without an entity (NIL) skipped")
    tables = [(brief, brief_path, brief_path.name), (e2d, e2d_path, e2d_path.name)]
    descs, _, original = _descriptions(tables, "description", plus, reader, notes)
    reader["kb_from"] = kb_source
    notes.append("WikiDiverse has no Wikidata ids: the qid column holds the entity's Wikipedia title")
    mentions = _mention_frame(rows, "entity_name", "mention_type", "topic", "start", "end", "_key")
    return _Read(mentions, _entities(kb_list, {}, descs, original), None, None, {"reader": reader}, notes)


# --------------------------------------------------------------------------------------------
# MIMIC cleaned layout


def _read_mimic(src: Path, prefix: str, name: str, images: Path | None) -> _Read:
    notes: list[str] = []
    reader: dict[str, Any] = {"nil_skipped": 0, "mentions_unquoted": 0}
    images_root = images if images is not None else src
    q_path, e_path = src / "qid2id.json", src / "kb_entity.json"
    id2qid: dict[int, str] = {}
    for q, i in _read_json(q_path, dict, "qid -> KB row id", key_field="qid").items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise DataError(f"expected an integer id, got {i!r:.60}", file=q_path, record=q, field="id")
        if i in id2qid:
            raise DataError(f"duplicate id {i} (also used by {id2qid[i]!r})", file=q_path, record=q, field="id")
        id2qid[i] = q
    by_id: dict[int, dict] = {}
    for pos, value in enumerate(_read_json(e_path, list, "KB entity records")):
        rec = _record(value, e_path, pos)
        eid = _need(rec, "id", e_path, pos, types=(int,))
        if eid in by_id:
            raise DataError("duplicate entity id", file=e_path, record=eid, field="id")
        ename = _need(rec, "entity_name", e_path, eid)
        attr = _need(rec, "attr", e_path, eid, allow_none=True)
        rels = []
        for img in _need(rec, "image_list", e_path, eid, types=(list,), allow_none=True) or []:
            if not isinstance(img, str):
                raise DataError(f"expected a file name, got {img!r:.60}", file=e_path, record=eid, field="image_list")
            rels.append("kb_image/" + datasets.check_relative_path(img, file=e_path, record=eid, field="image_list"))
        desc = attr.strip() if isinstance(attr, str) and attr.strip() else None
        by_id[eid] = {"qid": id2qid.get(eid, f"mimic-{eid}"), "name": unquote(ename), "description": desc,
                      "description_source": "mimic attr (released)" if desc else "none", "images": rels}
    no_qid = len(set(by_id) - set(id2qid))
    if no_qid:
        reader["entities_without_qid"] = no_qid
        notes.append(f"{no_qid} KB entit(y/ies) have no qid in qid2id.json; keyed 'mimic-<id>'")
    ents = [by_id[eid] for eid in sorted(by_id)]  # MIMIC sorts the KB by id
    kb = {e["qid"] for e in ents}
    dangling = len(set(id2qid) - set(by_id))
    if dangling:
        reader["qid2id_without_entity"] = dangling
        notes.append(f"{dangling} qid2id.json entr(y/ies) point to no kb_entity.json record")
    # mention images: the RichpediaMEL archive ships mention_images/ while MIMIC's config expects mention_image/
    m_folder = "mention_image"
    if not (images_root / m_folder).is_dir() and (images_root / "mention_images").is_dir():
        m_folder = "mention_images"
        reader["mention_image_folder"] = m_folder
        notes.append("the archive ships mention_images/ while MIMIC's config (github.com/pengfei-luo/MIMIC) "
                     "expects mention_image/, a folder-name mismatch reported there as MIMIC issue #2; "
                     "mention_images/ was used")
    elif not (images_root / m_folder).is_dir():
        notes.append(f"no mention_image/ (or mention_images/) folder under {images_root}: every "
                     "mention image is missing")
    rows: list[dict] = []
    for split in ("train", "dev", "test"):
        path = src / f"{prefix}_{split}.json"
        for i, value in enumerate(_read_json(path, list, "mention records")):
            rec = _record(value, path, i)
            raw_mention = _need(rec, "mentions", path, i)
            sentence = _need(rec, "sentence", path, i)
            img = _need(rec, "imgPath", path, i, allow_none=True)
            answer = _need(rec, "answer", path, i)
            image = None
            if img:
                datasets.check_relative_path(img, file=path, record=i, field="imgPath")
                # MIMIC keeps the stem before the first dot and appends .jpg (all converted to JPG)
                stem = img.replace("\\", "/").split("/")[-1].split(".")[0]
                if not stem:
                    raise DataError(f"imgPath {img!r} has no file name", file=path, record=i, field="imgPath")
                image = f"{m_folder}/{stem}.jpg"
            if answer.strip().lower() in NIL_ANSWERS:
                reader["nil_skipped"] += 1
                continue
            if answer not in kb:
                raise DataError(f"answer {answer!r} is not in the knowledge base (qid2id.json + "
                                "kb_entity.json)", file=path, record=i, field="answer")
            mention = unquote(raw_mention)
            if mention != raw_mention:
                reader["mentions_unquoted"] += 1
            rows.append({"mention_id": f"{split}-{i}", "split": split, "sentence": sentence, "mention": mention,
                         "image": image, "qid": answer,
                         "entity_name": rec["entities"] if isinstance(rec.get("entities"), str) else None})
    if reader["nil_skipped"]:
        notes.append(f"{reader['nil_skipped']} NIL mention(s) (answer 'nil') skipped, as MIMIC does")
    if reader["mentions_unquoted"]:
        notes.append(f"{reader['mentions_unquoted']} URL-quoted mention(s) unquoted, as MIMIC does")
    notes.append("mention images: the stem of imgPath + '.jpg' (MIMIC's convention); MIMIC turns a "
                 "missing image into an all-zero tensor silently, dimkit counts it")
    meta = {"reader": reader, "description_source": "mimic attr (released)", "mimic_prefix": prefix}
    return _Read(_mention_frame(rows, "entity_name"), _entity_frame(ents, datasets.is_augmented(name)), None,
                 images_root, meta, notes)


# --------------------------------------------------------------------------------------------
# MELBench raw layout


def _read_melbench(path: Path, subset: str, name: str, seed: int) -> _Read:
    data = _read_json(path, dict, "sample id -> record")
    if not data:
        raise DataError(f"no records found for the {subset} subset: the JSON object is empty (expected sample id "
                        "-> record, as in the released Wikidata-MEL.json / Richpedia-MEL.json)", file=path)
    rows: list[dict] = []
    names: dict[str, str] = {}
    conflicts = nil = 0
    ids_seen: dict[Any, str] = {}
    for key, value in data.items():
        rec = _record(value, path, key)
        sentence = _need(rec, "sentence", path, key)
        fields = {}
        for f in ("mentions", "entities", "answer"):
            v = _need(rec, f, path, key, types=(str, list))
            fields[f] = [v] if isinstance(v, str) else v
            for item in fields[f]:
                if not isinstance(item, str):
                    raise DataError(f"expected strings, got {item!r:.60}", file=path, record=key, field=f)
        lens = {f: len(v) for f, v in fields.items()}
        if len(set(lens.values())) != 1:
            raise DataError(f"parallel lists differ in length ({lens})", file=path, record=key, field="answer")
        rid = rec.get("id")
        if isinstance(rid, (str, int)):
            if rid in ids_seen:
                raise DataError(f"duplicate id {rid!r} (also record {ids_seen[rid]!r})", file=path, record=key,
                                field="id")
            ids_seen[rid] = key
        for j, (m, e, q) in enumerate(zip(fields["mentions"], fields["entities"], fields["answer"])):
            if q.strip().lower() in NIL_ANSWERS:
                nil += 1
                continue
            if q in names and names[q] != e:
                conflicts += 1
            names.setdefault(q, e)
            rows.append({"mention_id": f"{key}-{j}", "split": None, "sentence": sentence,
                         "mention": m, "image": None, "qid": q, "entity_name": e, "_key": key})
    if not rows:
        raise DataError(f"no records found for the {subset} subset: all {len(data)} record(s) have no answer "
                        "(NIL), so there is no mention to link", file=path, field="answer")
    split_of = seeded_split(data.keys(), seed, MELBENCH_FRACTIONS)
    for r in rows:
        r["split"] = split_of[r["_key"]]
    ents = [{"qid": q, "name": names[q], "description": None, "description_source": "none",
             "images": []} for q in sorted(names)]
    notes = [f"no splits in MELBench: sentences split 70/10/20 by seeded hash order (seed {seed}); all "
             "mentions of a sentence share a split",
             "no images and no descriptions in MELBench: the KB is the set of gold entities"]
    if conflicts:
        notes.append(f"{conflicts} mention(s) name their gold qid differently; the first name was kept")
    if nil:
        notes.append(f"{nil} mention(s) without an answer (NIL) skipped")
    meta = {"reader": {"sentences": len(data), "name_conflicts": conflicts, "nil_skipped": nil,
                       "split_fractions": list(MELBENCH_FRACTIONS)},
            "description_source": "none"}
    return _Read(_mention_frame(rows, "entity_name"), _entity_frame(ents, datasets.is_augmented(name)), None,
                 None, meta, notes)


# --------------------------------------------------------------------------------------------
# images: reference, link or copy


def _place_images(read: _Read, out: Path, copy: bool) -> tuple[dict, str | None, list[str]]:
    """Point the image paths of ``read`` to where the prepared dataset finds the files.

    Returns ``meta.json``'s "images", what to put at ``out/images`` ("symlink" to the images root,
    "copy" of the referenced files, or None) and the files to copy. Images inside the output folder
    are referenced in place.
    """
    if read.images_root is None:
        return {"root": None, "placement": "none"}, None, []
    root = read.images_root.resolve()
    meta: dict[str, Any] = {"root": str(root)}
    action = None
    try:
        prefix = os.path.relpath(root, out.resolve())
        inside = Path(prefix).parts[:1] != ("..",)
    except ValueError:  # another drive
        inside = False
    if inside:
        prefix = PurePosixPath(*Path(prefix).parts).as_posix()
        meta["placement"] = f"inside the dataset folder ({prefix})"
    elif not root.is_dir():
        prefix, meta["placement"] = "images", "none: images folder not found"
        read.notes.append(f"images folder {root} not found: image paths point to "
                          "images/ which does not exist; every image counts as missing")
    else:
        prefix, action = "images", "copy" if copy else "symlink"
        meta["placement"] = ("images/ holds copies of the referenced files" if copy
                             else "images/ -> symlink to the images root")
    m, e = read.mentions, read.entities
    mention_rel = {p for p in m["image"] if isinstance(p, str)}
    if "images" in m.columns:
        mention_rel.update(p for lst in m["images"] for p in lst)
    entity_rel = {p for lst in e["images"] for p in lst}
    # A link in the image folder may point anywhere (evil.jpg -> /etc/passwd): such files are
    # refused like missing ones, never copied, and dimkit.images never opens them either.
    where = {r: _resolved(root / r) for r in mention_rel | entity_rel}
    loops = {r for r, p in where.items() if p is None}
    outside = {r for r, p in where.items() if p is not None and not p.is_relative_to(root)}
    present = {r for r in mention_rel | entity_rel if r not in (outside | loops) and (root / r).is_file()}
    for kind, rels in (("mention", mention_rel), ("entity", entity_rel)):
        meta.update({f"{kind}_images_referenced": len(rels), f"{kind}_images_missing": len(rels - present - outside),
                     f"{kind}_images_outside": len(rels & outside)})
    if outside:
        shown = ", ".join(sorted(outside)[:3]) + (" ..." if len(outside) > 3 else "")
        read.notes.append(f"{len(outside)} referenced image file(s) resolve outside the images root {root} "
                          f"through a link ({shown}): refused, not copied, and unusable like missing ones "
                          "(`dimkit images` reports them); put the files themselves in the image folder")
    if loops:
        shown = ", ".join(sorted(loops)[:3]) + (" ..." if len(loops) > 3 else "")
        read.notes.append(f"{len(loops)} referenced image file(s) under {root} are links that never reach a file "
                          f"(a link loop: {shown}): counted as missing; replace the links with the image files")

    def moved(p: Any) -> str | None:
        return str(PurePosixPath(prefix) / p) if isinstance(p, str) else None

    m["image"] = [moved(p) for p in m["image"]]
    if "images" in m.columns:
        m["images"] = [[moved(p) for p in lst] for lst in m["images"]]
    e["images"] = [[moved(p) for p in lst] for lst in e["images"]]
    return meta, action, sorted(present)


def _resolved(path: Path) -> Path | None:
    """``path`` with every link followed, or None when its links loop (it then names no file)."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # a link loop: RuntimeError up to Python 3.12, OSError (ELOOP) after
        return None


# --------------------------------------------------------------------------------------------
# the stage: PrepareConfig -> run -> PrepareResult


@dataclass
class PrepareConfig(Config):
    """What ``dimkit prepare SRC --name NAME`` converts, and where to."""

    STAGE: ClassVar[str] = "prepare"

    src: Path = setting(None, "DIM data root or dataset folder, MIMIC folder, or a MELBench .json file",
                        positional=True)
    dataset: str = setting(None, "prepared dataset name (e.g. wikimel, rich+)", cli="--name")
    layout: str = setting("auto", "source layout (auto: detected)", choices=("auto",) + LAYOUTS)
    subset: str | None = setting(None, "which dataset of a source holding several: wikipedia, richpedia, "
                                       "wikidiverse (DIM), WIKIMEL, RichpediaMEL, wiki_diverse (MIMIC); "
                                       "aliases wikimel/rich/diverse work everywhere")
    images: Path | None = setting(None, "images root (DIM: the ImgData folder; MIMIC: the folder holding "
                                        "kb_image/ and mention_image/)")
    seed: int = setting(DEFAULT_SEED, "seed of the splits dimkit makes (MELBench; dev carved from train)", min=0)
    copy_images: bool = setting(False, "copy the referenced images instead of linking the images root")
    data_dir: Path | None = setting(None, "output root (default $DIMKIT_DATA)")
    force: bool = setting(False, "prepare again even when the source and the settings are unchanged, and "
                                 "replace a dataset of that name made from another source or by another stage")


@dataclass
class PrepareResult(Result):
    """The prepared dataset: its name, folder and ``meta.json``."""

    dataset: str
    root: Path
    meta: dict = field(default_factory=dict, repr=False)
    up_to_date: bool = False  # the source and settings were those of the dataset already there

    def summary(self) -> str:
        """Counts, images, candidates and the reader's notes (:func:`format_summary`)."""
        again = ("\n  up to date: the source files and settings are unchanged since it was prepared "
                 f"({option('force=True', '--force')} prepares it again)") if self.up_to_date else ""
        return format_summary(self.root) + again


def source_key(cfg: "PrepareConfig", src: Path) -> str:
    """What a prepared dataset was made from: the settings and every JSON file of the source (path,
    size, modification time), so a rerun on an unchanged source can skip the reading and writing."""
    from . import __version__

    files = [src] if src.is_file() else sorted(src.rglob("*.json"))
    stats = [(str(p.relative_to(src) if p != src else p.name), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    settings = {k: str(v) for k, v in cfg.to_dict().items() if k not in ("force", "data_dir")}
    return content_hash({"version": __version__, "src": str(src.resolve()), "settings": settings, "files": stats})


def _check_replace(out: Path, old: dict, src: Path, layout: str, subset: str) -> None:
    """Refuse to overwrite a dataset that this source did not prepare (unless ``force``).

    Preparing the same source again (same file or folder, layout and subset) replaces its earlier
    output: edited files or changed settings are meant to be picked up. Anything else in ``out``
    (a '+' dataset written by ``dimkit augment``, a dataset prepared from another source or subset)
    would be lost, so it stays unless the caller asks for the replacement.
    """
    name = old.get("name") or out.name
    aug = old.get("augment") if isinstance(old.get("augment"), dict) else {}
    lost = ""
    if old.get("augmented_from") or aug:
        what = (f"the dataset {name!r} that `dimkit augment` wrote from {old.get('augmented_from')!r} "
                f"(model {aug.get('model')!r}, template {aug.get('template')!r})")
        lost = ", and its LLM descriptions would be lost"
    elif not str(old.get("prepared_by", "")).startswith("dimkit.prepare"):
        what = f"the dataset {name!r}, which its meta.json does not say `dimkit prepare` wrote"
    elif (old.get("source_resolved"), old.get("layout"), old.get("subset")) == (str(src.resolve()), layout, subset):
        return
    elif (old.get("layout"), old.get("subset")) == (layout, subset) and old.get("source_resolved") and \
            not Path(old["source_resolved"]).exists():
        return  # the release it came from moved (or is gone): prepared again from where it is now
    else:
        mentions = (old.get("counts") or {}).get("mentions", "?")
        origin = old.get("source_resolved") or old.get("source")
        what = (f"the dataset {name!r} ({mentions} mentions) prepared from {origin} "
                f"({old.get('layout')}, {old.get('subset')})")
    raise ConfigError(
        f"{out} holds {what}. Preparing {src} ({layout}, {subset}) as {out.name!r} would replace it{lost}. "
        f"Choose another name ({option('dataset=...', '--name')}), or pass {option('force=True', '--force')} to "
        "replace it.")


def run(cfg: PrepareConfig) -> PrepareResult:
    """Convert ``cfg.src`` into the prepared dataset ``$DIMKIT_DATA/<cfg.dataset>``."""
    from . import __version__

    cfg = cfg.replace()  # a checked copy
    out = datasets.dataset_dir(cfg.dataset, cfg.data_dir)
    src = cfg.src.expanduser()
    if not src.exists():
        raise DataError("source not found", file=src)
    if cfg.images is not None and not cfg.images.is_dir():
        raise DataError("images folder not found", file=cfg.images)
    layout = cfg.layout
    if layout != "auto" and (layout == "melbench") != src.is_file():
        raise DataError("the MELBench layout is a .json file, not a folder" if layout == "melbench"
                        else f"the {layout} layout is a folder, not a file", file=src)
    try:
        detected, subset = detect_layout(src)
    except DataError:
        if layout == "auto":
            raise
        detected, subset = None, None
    if layout == "auto":
        layout = detected
    elif detected != layout:
        subset = None
    subset = _resolve_subset(layout, src, subset, cfg.subset, cfg.dataset)
    key = source_key(cfg, src)
    if not cfg.force and (out / "meta.json").is_file():
        fix = f"rerun with {option('force=True', '--force')}"
        old = datasets.read_json_file(out / "meta.json", what="the dataset's meta.json", fix=fix)
        _check_replace(out, old, src, layout, subset)
        if old.get("source_key") == key and (out / "mentions.parquet").is_file():
            return PrepareResult(dataset=cfg.dataset, root=out, meta=old, up_to_date=True)
    # ---- read everything first: every DataError is raised before anything is written
    if layout == "dim":
        read = _read_dim(src, subset, cfg.dataset, cfg.images, cfg.seed)
    elif layout == "mimic":
        read = _read_mimic(src, subset, cfg.dataset, cfg.images)
    else:
        read = _read_melbench(src, subset, cfg.dataset, cfg.seed)
        if cfg.images is not None:
            read.notes.append(f"{option('images=', '--images ')}{cfg.images} ignored: MELBench has no images")
    if read.mentions.empty:  # a dataset without a mention has nothing to train or evaluate on
        raise DataError(f"no mentions found ({layout} layout, {subset}): the split files hold no records, or only "
                        "records without an answer (NIL); check that this is the dataset you meant", file=src)
    read.mentions = read.mentions.drop(columns="_key", errors="ignore")
    img_meta, action, to_copy = _place_images(read, out, cfg.copy_images)
    if src.resolve() == paths.sample_source_dir().resolve():
        read.notes.append("the bundled synthetic sample: numbers on it are not comparable to the paper")
    meta = {"name": cfg.dataset, "layout": layout, "subset": subset, "dataset": _family(subset),
            "source": str(cfg.src), "source_resolved": str(src.resolve()), "seed": cfg.seed, "source_key": key,
            "prepared_by": f"dimkit.prepare {__version__}", "images": img_meta,
            "images_missing": img_meta.get("mention_images_missing", 0) + img_meta.get("entity_images_missing", 0),
            "notes": read.notes, **read.meta}
    # ---- write: the new images/ beside the old one, then the tables (validated), then images/ swapped in
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staged = out / f".images-new-{uuid.uuid4().hex[:8]}"
    try:
        if action == "symlink":
            os.symlink(read.images_root.resolve(), staged, target_is_directory=True)
        elif action == "copy":
            staged.mkdir()
            for rel in tqdm(to_copy, desc="copy images", unit="file"):
                (staged / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(read.images_root.resolve() / rel, staged / rel)
        datasets.write_prepared(out, read.mentions, read.entities, meta, candidates=read.candidates,
                                source=f"{src} ({layout})")
        if action is not None:
            atomic.swap_in(staged, out / "images")
        elif (out / "images").is_symlink():
            (out / "images").unlink()  # a link left by an earlier prepare of this name that no longer applies
    except BaseException:
        atomic.remove(staged)
        if created:
            atomic.remove(out)
        raise
    return PrepareResult(dataset=cfg.dataset, root=out, meta=meta)


def format_summary(root: str | Path) -> str:
    """A few lines on a prepared dataset: counts, images, candidates, reader notes."""
    root = Path(root)
    meta = json.loads((root / "meta.json").read_text())
    c = meta.get("counts", {})
    lines = [f"prepared {meta['name']!r} from {meta['source']} ({meta['layout']}, {meta['subset']})",
             f"  written to {root}",
             f"  mentions: {c.get('mentions', 0)} (train {c.get('mentions_train', 0)}, dev "
             f"{c.get('mentions_dev', 0)}, test {c.get('mentions_test', 0)}); entities: "
             f"{c.get('entities', 0)}; with image: {c.get('mentions_with_image', 0)}"]
    img = meta.get("images", {})
    if img.get("root"):
        outside = img.get("mention_images_outside", 0) + img.get("entity_images_outside", 0)
        refused = f"; refused (outside the images root): {outside}" if outside else ""
        lines.append(f"  images: {img['placement']}; referenced files missing: "
                     f"{meta.get('images_missing', 0)}{refused} (check them with `dimkit images "
                     f"{meta['name']}`)")
    cand = meta.get("candidates")
    if cand and cand.get("source") != "release":
        lines.append(f"  candidates: built by dimkit (top {cand.get('k')}, {cand.get('scorer')})")
    elif cand:
        lines.append(f"  candidates: {cand['mentions_with_list']} lists from {cand['file']} "
                     f"({cand['mentions_without_list']} mentions without one, "
                     f"{cand['unknown_qids_dropped']} unknown ids dropped)")
    lines += [f"  note: {note}" for note in meta.get("notes", [])]
    return "\n".join(lines)


#: The command line: ``dimkit prepare SRC --name NAME`` takes the flags of :class:`PrepareConfig`.
CONFIG = PrepareConfig
