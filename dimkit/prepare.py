"""Convert a released dataset into dimkit's prepared form (notebook ``00_data``).

``dimkit prepare SRC --name NAME`` reads one of three source layouts and writes
``$DIMKIT_DATA/NAME`` through :func:`dimkit.datasets.write_prepared` (validated, atomic):

- ``dim``: the DIM release (github.com/season1blue/DIM): ``SRC`` is the data root holding ``wikipedia/``,
  ``richpedia/`` or ``wikidiverse/`` beside ``ImgData/``, or one of those dataset folders.
- ``mimic``: the MIMIC "cleaned" layout (github.com/pengfei-luo/MIMIC): ``kb_entity.json``, ``qid2id.json``,
  ``<PREFIX>_{train,dev,test}.json``, ``kb_image/``, ``mention_image/``.
- ``melbench``: the raw MELBench files (github.com/seukgcode/MELBench): ``SRC`` is ``Wikidata-MEL.json`` or
  ``Richpedia-MEL.json``; no images; a seeded 70/10/20 split over sentences.

Bad input raises :class:`dimkit.errors.DataError` naming the file, the record and the field;
nothing is written until the whole source has been read and checked, and a failed write leaves
no new folder behind (a previous good output stays as it was). Images are referenced, never
opened here: :mod:`dimkit.images` checks them; ``meta.json`` counts referenced files that do not
exist (``images_missing``) and those that a link takes outside the images root
(``images.mention_images_outside``, ``images.entity_images_outside``), which are never copied.
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

from . import datasets, paths
from .errors import DataError, DimkitError, option
from .stage import Config, Result, setting

LAYOUTS = ("dim", "mimic", "melbench")
#: The three dataset families; every layout's subset maps to one of them.
FAMILIES = ("wikimel", "richpediamel", "wikidiverse")
#: Folder names of the DIM release, file prefixes of MIMIC, file stems of MELBench.
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


# --------------------------------------------------------------------------------------------
# small readers


class _DupDict(dict):
    """A JSON object that repeated a key (json.load would silently keep the last value)."""

    dups: list


def _read_json(path: Path, *, key_field: str = "key") -> Any:
    """Load a JSON file; missing file, bad encoding, malformed JSON and repeated keys raise.

    A leading UTF-8 byte order mark (as Windows editors write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", file=path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=path) from None
    found: list[bool] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        out: dict = {}
        dups = []
        for k, v in pairs:
            if k in out:
                dups.append(k)
            out[k] = v
        if dups:
            out = _DupDict(out)
            out.dups = dups
            found.append(True)
        return out

    try:
        data = json.loads(text, object_pairs_hook=hook)
    except json.JSONDecodeError as exc:
        raise DataError(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                        file=path) from None
    if found:
        _raise_duplicate(data, path, key_field)
    return data


def _first_dup(obj: Any) -> str | None:
    if isinstance(obj, _DupDict):
        return obj.dups[0]
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    for child in children:
        hit = _first_dup(child)
        if hit is not None:
            return hit
    return None


def _raise_duplicate(data: Any, path: Path, key_field: str) -> None:
    if isinstance(data, _DupDict):
        raise DataError("duplicate key: the JSON object repeats it (json would keep the last)",
                        file=path, record=data.dups[0], field=key_field)
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        hit = _first_dup(value)
        if hit is not None:
            raise DataError("duplicate field in one record", file=path, record=key, field=hit)


def _expect_dict(data: Any, path: Path, what: str) -> dict:
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object ({what}), got a {type(data).__name__}", file=path)
    return data


def _expect_list(data: Any, path: Path, what: str) -> list:
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list ({what}), got a {type(data).__name__}", file=path)
    return data


def _record(value: Any, path: Path, key: object) -> dict:
    if not isinstance(value, dict):
        raise DataError(f"expected an object, got a {type(value).__name__}", file=path, record=key)
    return value


def _need(rec: dict, name: str, path: Path, key: object, types: tuple = (str,),
          allow_none: bool = False) -> Any:
    """A required field of a record, of one of ``types``."""
    if name not in rec:
        raise DataError("required field is missing", file=path, record=key, field=name)
    value = rec[name]
    if value is None and allow_none:
        return None
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        want = " or ".join(t.__name__ for t in types)
        raise DataError(f"expected {want}, got {type(value).__name__} {value!r:.60}",
                        file=path, record=key, field=name)
    return value


def _hash_order(keys: Iterable[object], seed: int) -> list:
    """Keys in a seeded order that does not depend on Python's RNG, platform or input order."""
    return sorted(keys, key=lambda k: (hashlib.sha256(f"{seed}:{k}".encode()).hexdigest(), str(k)))


def seeded_split(keys: Iterable[object], seed: int = DEFAULT_SEED,
                 fractions: tuple[float, float, float] = MELBENCH_FRACTIONS) -> dict:
    """Assign each key to train/dev/test in the given proportions, deterministically by seed."""
    order = _hash_order(list(keys), seed)
    n = len(order)
    n_train = int(round(n * fractions[0]))
    n_dev = min(n - n_train, int(round(n * fractions[1])))
    out = {}
    for i, k in enumerate(order):
        out[k] = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
    return out


def _check_image(value: str, path: Path, key: object, field_name: str) -> str:
    return datasets.check_relative_path(value, file=path, record=key, field=field_name)


def _split_brief(text: str) -> tuple[str | None, str | None]:
    """``"<name> [SEP]. <desc>"`` -> (name, desc); the released code keeps the text after the last
    ``[SEP]. `` and encodes the literal ``None`` for entities without a brief, which we turn into None."""
    name = None
    desc = text
    if _SEP in text:
        name = text.split(_SEP, 1)[0].strip() or None
        desc = text.rsplit(_SEP, 1)[1]
    desc = desc.strip()
    if desc in ("", "None"):
        desc = None
    return name, desc


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


def _mention_frame(rows: list[dict], extra: Iterable[str] = ()) -> pd.DataFrame:
    cols = list(datasets.MENTION_COLUMNS) + [c for c in extra]
    return pd.DataFrame(rows, columns=cols)


def _entity_frame(rows: list[dict], plus: bool) -> pd.DataFrame:
    cols = list(datasets.ENTITY_COLUMNS) + (["description_original"] if plus else [])
    return pd.DataFrame(rows, columns=cols)


def _candidates_from(mentions: pd.DataFrame, lists: dict[str, list], by: str, kb: set,
                     path: Path, meta: dict) -> pd.DataFrame:
    """Map released candidate lists (keyed by mention text or gold name) onto mention ids."""
    rows = []
    missing = 0
    unknown: set = set()
    for mid, key in zip(mentions["mention_id"], mentions[by]):
        qids = lists.get(key)
        if qids is None:
            missing += 1
            continue
        kept = [q for q in qids if q in kb]
        unknown.update(q for q in qids if q not in kb)
        rows.append({"mention_id": mid, "qids": kept})
    meta.update(file=path.name, source="release", keyed_by=by, mentions_with_list=len(rows),
                mentions_without_list=missing, unknown_qids_dropped=len(unknown),
                max_len=max((len(r["qids"]) for r in rows), default=0))
    return pd.DataFrame(rows, columns=list(datasets.CANDIDATE_COLUMNS))


def _read_candidate_file(path: Path) -> dict[str, list]:
    data = _expect_dict(_read_json(path), path, "key -> list of candidates")
    for key, value in data.items():
        if not isinstance(value, list) or not all(isinstance(q, str) for q in value):
            raise DataError("expected a list of strings", file=path, record=key, field="candidates")
    return data


# --------------------------------------------------------------------------------------------
# layout detection


def _family(subset: str | None) -> str | None:
    if subset is None:
        return None
    key = re.sub(r"[^a-z]", "", subset.lower())
    return _FAMILY_ALIASES.get(key)


def _mimic_prefixes(folder: Path) -> list[str]:
    pat = re.compile(r"^(.+)_(train|dev|test)\.json$")
    return sorted({m.group(1) for p in folder.iterdir() if (m := pat.match(p.name))})


def _sniff_dim_subset(folder: Path) -> str | None:
    """Tell wikipedia / richpedia / wikidiverse apart from the records of a split file."""
    for fname in ("train.json", "test.json", "dev.json", "valid.json"):
        p = folder / fname
        if p.is_file():
            data = _read_json(p)
            if isinstance(data, list):
                return "wikidiverse"
            if isinstance(data, dict):
                for rec in list(data.values())[:200]:
                    if isinstance(rec, dict) and "imgPath" in rec:
                        return "wikipedia"
                    if isinstance(rec, dict) and "img_list" in rec:
                        return "richpedia"
            return None
    return None


def _sniff_melbench(path: Path) -> str | None:
    data = _read_json(path)
    if isinstance(data, dict):
        for rec in list(data.values())[:200]:
            if isinstance(rec, dict) and "mentions" in rec:
                return MELBENCH_STEMS["wikimel" if isinstance(rec["mentions"], list) else "richpediamel"]
    return None


_DIM_SPLIT_FILES = {"train.json", "test.json", "dev.json", "valid.json"}


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
        if fam in MELBENCH_STEMS:
            return "melbench", MELBENCH_STEMS[fam]
        return "melbench", _sniff_melbench(src)
    names = {p.name for p in src.iterdir()}
    if names & _DIM_SPLIT_FILES:
        if src.name in DIM_FOLDERS.values():
            return "dim", src.name
        return "dim", _sniff_dim_subset(src)
    prefixes = _mimic_prefixes(src)
    if "kb_entity.json" in names or prefixes:
        return "mimic", prefixes[0] if len(prefixes) == 1 else None
    found = [d for d in DIM_FOLDERS.values()
             if (src / d).is_dir() and any((src / d / f).is_file() for f in _DIM_SPLIT_FILES)]
    if found:
        return "dim", found[0] if len(found) == 1 else None
    raise DataError(
        "cannot tell the layout: expected a DIM data root (wikipedia/, richpedia/ or wikidiverse/ "
        "beside ImgData/), a DIM dataset folder (train.json, test.json ...), a MIMIC folder "
        "(kb_entity.json, qid2id.json, <PREFIX>_train.json ...) or a MELBench .json file", file=src)


def _resolve_subset(layout: str, src: Path, detected: str | None, subset: str | None,
                    name: str) -> str:
    """The source-specific subset: explicit option, else detected, else the dataset name's family."""
    if layout == "dim":
        mapping = DIM_FOLDERS
        if src.is_dir() and {p.name for p in src.iterdir()} & _DIM_SPLIT_FILES:
            choices = list(DIM_FOLDERS.values())  # a dataset folder: any reader flavour applies
        else:
            choices = [d for d in DIM_FOLDERS.values() if (src / d).is_dir()]
    elif layout == "mimic":
        mapping = MIMIC_PREFIXES
        choices = _mimic_prefixes(src) if src.is_dir() else []
    else:
        mapping = MELBENCH_STEMS
        choices = list(MELBENCH_STEMS.values())

    def pick(fam: str | None) -> str | None:
        if fam not in mapping:
            return None
        hit = [c for c in choices if c.lower() == mapping[fam].lower()]
        return hit[0] if hit else None

    if subset is not None:
        exact = [c for c in choices if c.lower() == subset.lower()]
        got = exact[0] if exact else pick(_family(subset))
        if got is None:
            raise DimkitError(f"unknown subset {subset!r} for layout {layout!r} in {src}; choose "
                              f"from {', '.join(choices) or '(none found)'}")
        return got
    if detected is not None:
        return detected
    got = pick(_family(datasets.base_name(name)))
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


def _dim_paths(src: Path, subset: str, images: str | Path | None) -> tuple[Path, Path | None]:
    """Dataset folder and images root of a DIM release source."""
    if (src / subset).is_dir() and not (src / "train.json").exists():
        folder = src / subset
        default_images = src / "ImgData"
    else:
        folder = src
        default_images = src / "ImgData" if (src / "ImgData").is_dir() else src.parent / "ImgData"
    if images is not None:
        return folder, Path(images)
    return folder, default_images


def _dim_split_files(folder: Path) -> tuple[list[tuple[str, Path]], list[str]]:
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
            raise DataError("file not found (a DIM dataset folder needs train.json and test.json)",
                            file=p)
    return files, notes


def _read_dim(src: Path, subset: str, name: str, images: str | Path | None, seed: int) -> _Read:
    folder, images_root = _dim_paths(src, subset, images)
    plus = datasets.is_augmented(name)
    files, notes = _dim_split_files(folder)
    if subset == "wikidiverse":
        out = _read_dim_diverse(folder, files, plus, seed)
    else:
        out = _read_dim_wiki_rich(folder, subset, files, plus, seed)
    out.images_root = images_root
    out.notes[:0] = notes
    out.meta["dataset_folder"] = str(folder)
    return out


def _carve_dev(rows: list[dict], seed: int, key_col: str = "_key") -> tuple[list[dict], str]:
    """Move a seeded 10% of train rows to dev (the Richpedia release has no dev.json)."""
    train_keys = [r[key_col] for r in rows if r["split"] == "train"]
    n = len(train_keys)
    n_dev = max(1, int(round(n * DEV_CARVE_FRACTION))) if n >= 2 else 0
    dev = set(_hash_order(train_keys, seed)[:n_dev])
    for r in rows:
        if r["split"] == "train" and r[key_col] in dev:
            r["split"] = "dev"
    return rows, (f"no dev.json: {n_dev} of {n} train.json records ({DEV_CARVE_FRACTION:.0%}, "
                  f"seeded hash order, seed {seed}) were moved to dev; their mention_id keeps the "
                  f"'train-' prefix")


def _read_dim_wiki_rich(folder: Path, subset: str, files: list[tuple[str, Path]], plus: bool,
                        seed: int) -> _Read:
    rich = subset == "richpedia"
    notes: list[str] = []
    reader: dict[str, Any] = {"answer_glitches_remapped": 0, "nil_skipped": 0}
    # ---- the KB: qids_ordered.json (the index DIM's features are aligned to), else brief.json
    brief_path = folder / "brief.json"
    fact_path = folder / "fact.json"
    brief = None
    if brief_path.is_file():
        brief = _expect_dict(_read_json(brief_path, key_field="qid"), brief_path, "qid -> brief")
    elif plus:
        raise DataError("file not found (a '+' dataset's LLM descriptions live in brief.json)",
                        file=brief_path)
    kb_path = folder / "qids_ordered.json"
    if kb_path.is_file():
        raw = _read_json(kb_path, key_field="qid")
        kb_list = list(raw.keys()) if isinstance(raw, dict) else _expect_list(raw, kb_path, "sorted qids")
        seen: dict[str, int] = {}
        for i, q in enumerate(kb_list):
            if not isinstance(q, str) or not q:
                raise DataError(f"expected a qid string, got {q!r}", file=kb_path, record=i, field="qid")
            if q in seen:
                raise DataError(f"duplicate qid (also at position {seen[q]})", file=kb_path,
                                record=q, field="qid")
            seen[q] = i
        kb_source = kb_path.name
    elif brief is not None:
        kb_list = list(brief.keys())
        kb_source = brief_path.name
    else:
        raise DataError("file not found (the KB comes from qids_ordered.json, or brief.json)",
                        file=kb_path)
    kb = set(kb_list)
    # ---- mentions
    rows: list[dict] = []
    gold_names: dict[str, str] = {}
    record_briefs: dict[str, str] = {}
    non_jpg = 0
    for split, path in files:
        data = _expect_dict(_read_json(path), path, "sample key -> record")
        for key, value in data.items():
            rec = _record(value, path, key)
            sentence = _need(rec, "sentence", path, key)
            mention = _need(rec, "mentions", path, key)
            answer = _need(rec, "answer", path, key, allow_none=True)
            image = None
            images: list[str] = []
            if rich:
                lst = rec.get("img_list")
                if lst is not None:
                    if not isinstance(lst, list):
                        raise DataError(f"expected a list, got {type(lst).__name__}", file=path,
                                        record=key, field="img_list")
                    for item in lst:
                        if not isinstance(item, str):
                            raise DataError(f"expected a file name, got {item!r:.60}", file=path,
                                            record=key, field="img_list")
                        # prepare_richpedia.py keeps only .jpg files
                        if item.rsplit(".", 1)[-1].lower() != "jpg":
                            non_jpg += 1
                            continue
                        rel = _check_image(item, path, key, "img_list")
                        images.append(f"richpedia/images/{rel}")
                image = images[0] if images else None
            else:
                img = _need(rec, "imgPath", path, key, allow_none=True)
                if img:
                    image = _check_image(img, path, key, "imgPath")
            if answer is not None and answer.strip().lower() in NIL_ANSWERS:
                answer = None
            if answer is None:
                reader["nil_skipped"] += 1
                continue
            if answer not in kb and answer in ANSWER_GLITCHES:
                answer = ANSWER_GLITCHES[answer]
                reader["answer_glitches_remapped"] += 1
            if answer not in kb:
                raise DataError(f"answer {answer!r} is not in the knowledge base ({kb_source})",
                                file=path, record=key, field="answer")
            ent_name = rec.get("entities")
            if isinstance(ent_name, str) and ent_name:
                gold_names.setdefault(answer, ent_name)
            else:
                ent_name = None
            if isinstance(rec.get("brief"), str):
                record_briefs.setdefault(answer, rec["brief"])
            row = {"mention_id": f"{split}-{key}", "split": split, "sentence": sentence,
                   "mention": mention, "image": image, "qid": answer, "entity_name": ent_name,
                   "_key": key}
            if rich:
                row["images"] = images
            rows.append(row)
    if not any(s == "dev" for s, _ in files):
        rows, note = _carve_dev(rows, seed)
        notes.append(note)
        reader["dev_carved_from_train"] = sum(r["split"] == "dev" for r in rows)
    if reader["answer_glitches_remapped"]:
        notes.append(f"{reader['answer_glitches_remapped']} answer(s) 'c' remapped to Q5729149 "
                     "(the release's glitch, remapped the same way in DIM's dataset.py)")
    if reader["nil_skipped"]:
        notes.append(f"{reader['nil_skipped']} record(s) without an answer (NIL) skipped; "
                     "the released code cannot use them")
    if non_jpg:
        reader["non_jpg_images_dropped"] = non_jpg
        notes.append(f"{non_jpg} non-.jpg file(s) in img_list dropped, as prepare_richpedia.py does")
    # ---- entities: names and descriptions
    names: dict[str, str] = {}
    ne_path = folder / "ne2qid.json"
    if ne_path.is_file():
        ne = _expect_dict(_read_json(ne_path, key_field="name"), ne_path, "entity name -> qid")
        for ent, q in ne.items():
            if not isinstance(q, str):
                raise DataError(f"expected a qid string, got {q!r:.60}", file=ne_path, record=ent,
                                field="qid")
            names.setdefault(q, ent)
    descs: dict[str, str | None] = {}
    brief_names: dict[str, str] = {}
    none_literal = 0

    def parse(table: dict, path: Path) -> dict[str, str | None]:
        nonlocal none_literal
        out = {}
        for q, text in table.items():
            if text is None:
                out[q] = None
                continue
            if not isinstance(text, str):
                raise DataError(f"expected a string, got {type(text).__name__}", file=path,
                                record=q, field="brief")
            nm, desc = _split_brief(text)
            if desc is None and text.strip().endswith("None"):
                none_literal += 1
            if nm:
                brief_names.setdefault(q, nm)
            out[q] = desc
        return out

    fact = None
    if fact_path.is_file():
        fact = _expect_dict(_read_json(fact_path, key_field="qid"), fact_path, "qid -> fact")
    original: dict[str, str | None] | None = None
    if brief is not None:
        descs = parse(brief, brief_path)
        desc_file = brief_path.name
    elif fact is not None:
        descs = parse(fact, fact_path)
        desc_file = fact_path.name
    elif record_briefs:
        descs = parse(record_briefs, files[0][1])
        desc_file = "records' brief field"
    else:
        desc_file = None
        notes.append("no brief.json, fact.json or brief field: entities have no description")
    if plus:
        if fact is not None:
            original = parse(fact, fact_path)
            orig_file = fact_path.name
        elif record_briefs:
            original = parse(record_briefs, files[0][1])
            orig_file = "records' brief field"
        else:
            original = {}
            orig_file = None
            notes.append("'+' dataset without fact.json or brief fields: description_original "
                         "is empty")
        reader["description_original_from"] = orig_file
    if none_literal:
        notes.append(f"{none_literal} description(s) were the literal text 'None' (entity without a "
                     "brief); stored as no description (the released code encodes the word 'None')")
    source_label = "llm (released)" if plus else "wikipedia (released)"
    ents = []
    for q in kb_list:
        desc = descs.get(q)
        row = {"qid": q, "name": names.get(q) or gold_names.get(q) or brief_names.get(q) or q,
               "description": desc, "description_source": source_label if desc else "none",
               "images": []}
        if plus:
            row["description_original"] = original.get(q) if original else None
        ents.append(row)
    if brief is not None:
        extra = len(set(brief) - kb)
        if extra:
            notes.append(f"{extra} brief.json entr(y/ies) not in {kb_source} ignored")
    reader.update(kb_from=kb_source, descriptions_from=desc_file,
                  descriptions=sum(1 for e in ents if e["description"]))
    mentions = _mention_frame(rows, ["entity_name"] + (["images"] if rich else []))
    entities = _entity_frame(ents, plus)
    cand = None
    cand_path = folder / "search_top100.json"
    meta: dict[str, Any] = {"reader": reader}
    if cand_path.is_file():
        cmeta: dict[str, Any] = {}
        cand = _candidates_from(mentions, _read_candidate_file(cand_path), "mention", kb,
                                cand_path, cmeta)
        cmeta["note"] = ("DIM's fuzzy top-100 lists, keyed by mention text; the gold is not "
                         "inserted (DIM ranks over the list plus the gold)")
        meta["candidates"] = cmeta
    meta["description_source"] = source_label if desc_file else "none"
    return _Read(mentions, entities, cand, None, meta, notes)


def _read_dim_diverse(folder: Path, files: list[tuple[str, Path]], plus: bool, seed: int) -> _Read:
    notes: list[str] = []
    reader: dict[str, Any] = {"nil_skipped": 0}
    # ---- the KB (titles): entity_list.json, else brief.json, else entity2desc.json, else gold
    brief_path = folder / "brief.json"
    e2d_path = folder / "entity2desc.json"
    brief = (_expect_dict(_read_json(brief_path, key_field="entity"), brief_path, "title -> brief")
             if brief_path.is_file() else None)
    e2d = (_expect_dict(_read_json(e2d_path, key_field="entity"), e2d_path, "title -> description")
           if e2d_path.is_file() else None)
    if plus and brief is None:
        raise DataError("file not found (a '+' dataset's LLM descriptions live in brief.json)",
                        file=brief_path)
    list_path = folder / "entity_list.json"
    kb_list: list[str] | None = None
    if list_path.is_file():
        raw = _expect_list(_read_json(list_path), list_path, "entity titles in feature order")
        seen: dict[str, int] = {}
        for i, t in enumerate(raw):
            if not isinstance(t, str) or not t:
                raise DataError(f"expected an entity title, got {t!r:.60}", file=list_path,
                                record=i, field="entity")
            if t in seen:
                raise DataError(f"duplicate entity (also at position {seen[t]})", file=list_path,
                                record=t, field="entity")
            seen[t] = i
        kb_list, kb_source = raw, list_path.name
    elif brief is not None:
        kb_list, kb_source = list(brief), brief_path.name
    elif e2d is not None:
        kb_list, kb_source = list(e2d), e2d_path.name
    else:
        kb_source = "gold entities of the split files"
    kb = set(kb_list) if kb_list is not None else None
    rows: list[dict] = []
    gold: list[str] = []
    for split, path in files:
        data = _expect_list(_read_json(path), path, "WikiDiverse records")
        for i, value in enumerate(data):
            rec = _record(value, path, i)
            sentence = _need(rec, "sentence", path, i)
            mention = _need(rec, "mention", path, i)
            entity = _need(rec, "entity", path, i, allow_none=True)
            img = _need(rec, "mention_image", path, i, allow_none=True)
            image = _check_image(img, path, i, "mention_image") if img else None
            if entity is None or entity.strip().lower() in NIL_ANSWERS:
                reader["nil_skipped"] += 1
                continue
            if kb is not None and entity not in kb:
                raise DataError(f"answer {entity!r} is not in the knowledge base ({kb_source})",
                                file=path, record=i, field="entity")
            gold.append(entity)
            rows.append({
                "mention_id": f"{split}-{i}", "split": split, "sentence": sentence,
                "mention": mention, "image": f"wikidiverse/{image}" if image else None,
                "qid": entity, "entity_name": entity,
                "mention_type": rec.get("mention_type"), "topic": rec.get("topic"),
                "start": rec.get("start"), "end": rec.get("end"), "_key": i})
    if kb_list is None:
        kb_list = sorted(set(gold))
        kb = set(kb_list)
        notes.append("no entity_list.json, brief.json or entity2desc.json: the KB is the set of "
                     "gold entities")
    if not any(s == "dev" for s, _ in files):
        rows, note = _carve_dev(rows, seed)
        notes.append(note)
        reader["dev_carved_from_train"] = sum(r["split"] == "dev" for r in rows)
    if reader["nil_skipped"]:
        notes.append(f"{reader['nil_skipped']} record(s) without an entity (NIL) skipped")

    def parse(table: dict | None, path: Path) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for t, text in (table or {}).items():
            if text is not None and not isinstance(text, str):
                raise DataError(f"expected a string, got {type(text).__name__}", file=path,
                                record=t, field="description")
            out[t] = _split_brief(text)[1] if text is not None else None
        return out

    if brief is not None:
        descs, desc_file = parse(brief, brief_path), brief_path.name
    elif e2d is not None:
        descs, desc_file = parse(e2d, e2d_path), e2d_path.name
    else:
        descs, desc_file = {}, None
        notes.append("no brief.json or entity2desc.json: entities have no description")
    original = parse(e2d, e2d_path) if plus else None
    if plus and e2d is None:
        notes.append("'+' dataset without entity2desc.json: description_original is empty")
    source_label = "llm (released)" if plus else "wikipedia (released)"
    ents = []
    for t in kb_list:
        desc = descs.get(t)
        row = {"qid": t, "name": t, "description": desc,
               "description_source": source_label if desc else "none", "images": []}
        if plus:
            row["description_original"] = original.get(t) if original else None
        ents.append(row)
    reader.update(kb_from=kb_source, descriptions_from=desc_file,
                  descriptions=sum(1 for e in ents if e["description"]))
    notes.append("WikiDiverse has no Wikidata ids: the qid column holds the entity's Wikipedia title")
    mentions = _mention_frame(rows, ["entity_name", "mention_type", "topic", "start", "end"])
    entities = _entity_frame(ents, plus)
    meta: dict[str, Any] = {"reader": reader,
                            "description_source": source_label if desc_file else "none"}
    cand = None
    cand_path = folder / "search_top100.json"
    if cand_path.is_file():
        cmeta: dict[str, Any] = {}
        cand = _candidates_from(mentions, _read_candidate_file(cand_path), "qid", kb, cand_path,
                                cmeta)
        cmeta["note"] = ("label leakage: the released lists are keyed by the GOLD entity (the "
                         "sample's WikiDiverse cands + random same-type entities); DIM evaluates "
                         "[gold] + list truncated to 80. Stored as released, gold not inserted.")
        meta["candidates"] = cmeta
        notes.append("candidates.parquet imported from search_top100.json, which is keyed by the "
                     "gold entity (label leakage)")
    return _Read(mentions, entities, cand, None, meta, notes)


# --------------------------------------------------------------------------------------------
# MIMIC cleaned layout


def _read_mimic(src: Path, prefix: str, name: str, images: str | Path | None) -> _Read:
    notes: list[str] = []
    reader: dict[str, Any] = {"nil_skipped": 0, "mentions_unquoted": 0}
    images_root = Path(images) if images is not None else src
    q_path = src / "qid2id.json"
    e_path = src / "kb_entity.json"
    qid2id = _expect_dict(_read_json(q_path, key_field="qid"), q_path, "qid -> KB row id")
    id2qid: dict[int, str] = {}
    for q, i in qid2id.items():
        if not isinstance(i, int) or isinstance(i, bool):
            raise DataError(f"expected an integer id, got {i!r:.60}", file=q_path, record=q, field="id")
        if i in id2qid:
            raise DataError(f"duplicate id {i} (also used by {id2qid[i]!r})", file=q_path,
                            record=q, field="id")
        id2qid[i] = q
    raw = _expect_list(_read_json(e_path), e_path, "KB entity records")
    ents_raw = []
    seen_ids: set[int] = set()
    for pos, value in enumerate(raw):
        rec = _record(value, e_path, pos)
        eid = _need(rec, "id", e_path, pos, types=(int,))
        if eid in seen_ids:
            raise DataError("duplicate entity id", file=e_path, record=eid, field="id")
        seen_ids.add(eid)
        ename = _need(rec, "entity_name", e_path, eid)
        attr = _need(rec, "attr", e_path, eid, allow_none=True)
        imgs = _need(rec, "image_list", e_path, eid, types=(list,), allow_none=True) or []
        rels = []
        for img in imgs:
            if not isinstance(img, str):
                raise DataError(f"expected a file name, got {img!r:.60}", file=e_path, record=eid,
                                field="image_list")
            rels.append("kb_image/" + _check_image(img, e_path, eid, "image_list"))
        ents_raw.append((eid, ename, attr, rels))
    ents_raw.sort(key=lambda x: x[0])  # MIMIC sorts the KB by id
    no_qid = 0
    ents = []
    for eid, ename, attr, rels in ents_raw:
        q = id2qid.get(eid)
        if q is None:
            no_qid += 1
            q = f"mimic-{eid}"
        desc = attr.strip() if isinstance(attr, str) and attr.strip() else None
        ents.append({"qid": q, "name": unquote(ename), "description": desc,
                     "description_source": "mimic attr (released)" if desc else "none",
                     "images": rels})
    if no_qid:
        reader["entities_without_qid"] = no_qid
        notes.append(f"{no_qid} KB entit(y/ies) have no qid in qid2id.json; keyed 'mimic-<id>'")
    kb = {e["qid"] for e in ents}
    dangling = sum(1 for i in id2qid if i not in seen_ids)
    if dangling:
        reader["qid2id_without_entity"] = dangling
        notes.append(f"{dangling} qid2id.json entr(y/ies) point to no kb_entity.json record")
    # mention images: the RichpediaMEL archive ships mention_images/ (MIMIC issue #2)
    if (images_root / "mention_image").is_dir():
        m_folder = "mention_image"
    elif (images_root / "mention_images").is_dir():
        m_folder = "mention_images"
        reader["mention_image_folder"] = m_folder
        notes.append("the archive ships mention_images/ while MIMIC's config expects mention_image/ "
                     "(MIMIC issue #2); mention_images/ was used")
    else:
        m_folder = "mention_image"
        notes.append(f"no mention_image/ (or mention_images/) folder under {images_root}: every "
                     "mention image is missing")
    rows: list[dict] = []
    for split in ("train", "dev", "test"):
        path = src / f"{prefix}_{split}.json"
        data = _expect_list(_read_json(path), path, "mention records")
        for i, value in enumerate(data):
            rec = _record(value, path, i)
            raw_mention = _need(rec, "mentions", path, i)
            sentence = _need(rec, "sentence", path, i)
            img = _need(rec, "imgPath", path, i, allow_none=True)
            answer = _need(rec, "answer", path, i)
            image = None
            if img:
                _check_image(img, path, i, "imgPath")
                # MIMIC keeps the stem before the first dot and appends .jpg (all converted to JPG)
                stem = img.replace("\\", "/").split("/")[-1].split(".")[0]
                if not stem:
                    raise DataError(f"imgPath {img!r} has no file name", file=path, record=i,
                                    field="imgPath")
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
            ent_name = rec.get("entities") if isinstance(rec.get("entities"), str) else None
            rows.append({"mention_id": f"{split}-{i}", "split": split, "sentence": sentence,
                         "mention": mention, "image": image, "qid": answer,
                         "entity_name": ent_name})
    if reader["nil_skipped"]:
        notes.append(f"{reader['nil_skipped']} NIL mention(s) (answer 'nil') skipped, as MIMIC does")
    if reader["mentions_unquoted"]:
        notes.append(f"{reader['mentions_unquoted']} URL-quoted mention(s) unquoted, as MIMIC does")
    notes.append("mention images: the stem of imgPath + '.jpg' (MIMIC's convention); MIMIC turns a "
                 "missing image into an all-zero tensor silently, dimkit counts it")
    mentions = _mention_frame(rows, ["entity_name"])
    entities = _entity_frame(ents, datasets.is_augmented(name))
    meta = {"reader": reader, "description_source": "mimic attr (released)",
            "mimic_prefix": prefix}
    return _Read(mentions, entities, None, images_root, meta, notes)


# --------------------------------------------------------------------------------------------
# MELBench raw layout


def _read_melbench(path: Path, name: str, seed: int) -> _Read:
    notes: list[str] = []
    data = _expect_dict(_read_json(path), path, "sample id -> record")
    rows: list[dict] = []
    names: dict[str, str] = {}
    conflicts = 0
    nil = 0
    ids_seen: dict[Any, str] = {}
    for key, value in data.items():
        rec = _record(value, path, key)
        sentence = _need(rec, "sentence", path, key)
        fields = {}
        for f in ("mentions", "entities", "answer"):
            v = _need(rec, f, path, key, types=(str, list))
            v = [v] if isinstance(v, str) else v
            for item in v:
                if not isinstance(item, str):
                    raise DataError(f"expected strings, got {item!r:.60}", file=path, record=key,
                                    field=f)
            fields[f] = v
        lens = {f: len(v) for f, v in fields.items()}
        if len(set(lens.values())) != 1:
            raise DataError(f"parallel lists differ in length ({lens})", file=path, record=key,
                            field="answer")
        if "id" in rec:
            rid = rec["id"]
            if isinstance(rid, (str, int)):
                if rid in ids_seen:
                    raise DataError(f"duplicate id {rid!r} (also record {ids_seen[rid]!r})",
                                    file=path, record=key, field="id")
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
    split_of = seeded_split(data.keys(), seed, MELBENCH_FRACTIONS)
    for r in rows:
        r["split"] = split_of[r["_key"]]
    kb_list = sorted(names)
    ents = [{"qid": q, "name": names[q], "description": None, "description_source": "none",
             "images": []} for q in kb_list]
    notes.append(f"no splits in MELBench: sentences split 70/10/20 by seeded hash order "
                 f"(seed {seed}); all mentions of a sentence share a split")
    notes.append("no images and no descriptions in MELBench: the KB is the set of gold entities")
    if conflicts:
        notes.append(f"{conflicts} mention(s) name their gold qid differently; the first name was kept")
    if nil:
        notes.append(f"{nil} mention(s) without an answer (NIL) skipped")
    mentions = _mention_frame(rows, ["entity_name"])
    entities = _entity_frame(ents, datasets.is_augmented(name))
    meta = {"reader": {"sentences": len(data), "name_conflicts": conflicts, "nil_skipped": nil,
                       "split_fractions": list(MELBENCH_FRACTIONS)},
            "description_source": "none"}
    return _Read(mentions, entities, None, None, meta, notes)


# --------------------------------------------------------------------------------------------
# images: reference, link or copy


def _prefix_paths(read: _Read, prefix: str) -> None:
    def fix(p: Any) -> Any:
        if p is None or (isinstance(p, float) and p != p):
            return None
        return str(PurePosixPath(prefix) / p)

    m = read.mentions
    m["image"] = [fix(p) for p in m["image"]]
    if "images" in m.columns:
        m["images"] = [[fix(p) for p in lst] for lst in m["images"]]
    read.entities["images"] = [[fix(p) for p in lst] for lst in read.entities["images"]]


def _referenced(read: _Read) -> tuple[set[str], set[str]]:
    m = read.mentions
    mention = {p for p in m["image"] if isinstance(p, str)}
    if "images" in m.columns:
        mention.update(p for lst in m["images"] for p in lst)
    entity = {p for lst in read.entities["images"] for p in lst}
    return mention, entity


def _version() -> str:
    # importlib.metadata, not dimkit.__version__: the package may be imported without its __init__
    try:
        from importlib.metadata import version
        return version("dimkit")
    except Exception:  # not installed (e.g. run from a bare checkout)
        return "unknown"


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.is_dir():
        shutil.rmtree(p)


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
    seed: int = setting(DEFAULT_SEED, "seed of the splits dimkit makes (MELBench; dev carved from train)")
    copy_images: bool = setting(False, "copy the referenced images instead of linking the images root")
    data_dir: Path | None = setting(None, "output root (default $DIMKIT_DATA)")


@dataclass
class PrepareResult(Result):
    """The prepared dataset: its name, folder and ``meta.json``."""

    dataset: str
    root: Path
    meta: dict = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """Counts, images, candidates and the reader's notes (:func:`format_summary`)."""
        return format_summary(self.root)


def run(cfg: PrepareConfig) -> PrepareResult:
    """Convert ``cfg.src`` into the prepared dataset ``$DIMKIT_DATA/<cfg.dataset>``."""
    cfg = cfg.replace()  # a checked copy
    key, layout, images, seed = cfg.dataset, cfg.layout, cfg.images, cfg.seed
    out = datasets.dataset_dir(key, cfg.data_dir)
    src_given = cfg.src
    src = cfg.src.expanduser()
    if not src.exists():
        raise DataError("source not found", file=src)
    if images is not None and not images.is_dir():
        raise DataError("images folder not found", file=images)
    if layout == "auto":
        layout, detected_subset = detect_layout(src)
    else:
        if layout == "melbench" and not src.is_file():
            raise DataError("the MELBench layout is a .json file, not a folder", file=src)
        if layout != "melbench" and src.is_file():
            raise DataError(f"the {layout} layout is a folder, not a file", file=src)
        try:
            detected_layout, detected_subset = detect_layout(src)
        except DataError:
            detected_layout, detected_subset = None, None
        if detected_layout != layout:
            detected_subset = None
    sub = _resolve_subset(layout, src, detected_subset, cfg.subset, key)
    # ---- read everything first: every DataError is raised before anything is written
    if layout == "dim":
        read = _read_dim(src, sub, key, images, seed)
    elif layout == "mimic":
        read = _read_mimic(src, sub, key, images)
    else:
        read = _read_melbench(src, key, seed)
        if images is not None:
            read.notes.append(f"{option('images=', '--images ')}{images} ignored: MELBench has no images")
    family = _family(sub)
    read.mentions = read.mentions.drop(columns=[c for c in ("_key",) if c in read.mentions.columns])
    # ---- where images go: referenced in place when inside the output folder, else via images/
    img_meta: dict[str, Any] = {"root": None, "placement": "none"}
    action = None
    if read.images_root is not None:
        root_abs = read.images_root.resolve()
        img_meta["root"] = str(root_abs)
        try:
            prefix = os.path.relpath(root_abs, out.resolve())
            inside = not os.path.isabs(prefix) and Path(prefix).parts[:1] != ("..",)
        except ValueError:  # another drive
            inside = False
        if inside:
            prefix = PurePosixPath(*Path(prefix).parts).as_posix() if prefix != "." else "."
            img_meta["placement"] = f"inside the dataset folder ({prefix})"
        else:
            prefix = "images"
            if not root_abs.is_dir():
                img_meta["placement"] = "none: images folder not found"
                read.notes.append(f"images folder {root_abs} not found: image paths point to "
                                  "images/ which does not exist; every image counts as missing")
            else:
                action = "copy" if cfg.copy_images else "symlink"
                img_meta["placement"] = ("images/ holds copies of the referenced files" if cfg.copy_images
                                         else "images/ -> symlink to the images root")
        mention_rel, entity_rel = _referenced(read)
        # A link in the image folder may point anywhere (evil.jpg -> /etc/passwd): such files are
        # refused like missing ones, never copied, and dimkit.images never opens them either.
        outside = {r for r in mention_rel | entity_rel
                   if not (root_abs / r).resolve().is_relative_to(root_abs)}
        exists = {r: r not in outside and (root_abs / r).is_file() for r in mention_rel | entity_rel}
        _prefix_paths(read, prefix)
        img_meta.update(
            mention_images_referenced=len(mention_rel),
            mention_images_missing=sum(1 for r in mention_rel if not exists[r] and r not in outside),
            mention_images_outside=len(mention_rel & outside),
            entity_images_referenced=len(entity_rel),
            entity_images_missing=sum(1 for r in entity_rel if not exists[r] and r not in outside),
            entity_images_outside=len(entity_rel & outside))
        if outside:
            shown = ", ".join(sorted(outside)[:3]) + (" ..." if len(outside) > 3 else "")
            read.notes.append(
                f"{len(outside)} referenced image file(s) resolve outside the images root "
                f"{root_abs} through a link ({shown}): refused, not copied, and unusable like "
                "missing ones (`dimkit images` reports them); put the files themselves in the "
                "image folder")
        to_copy = sorted(r for r, ok in exists.items() if ok)
    images_missing = img_meta.get("mention_images_missing", 0) + img_meta.get("entity_images_missing", 0)
    meta = {
        "name": key, "layout": layout, "subset": sub, "dataset": family,
        "source": str(src_given), "source_resolved": str(src.resolve()), "seed": seed,
        "prepared_by": f"dimkit.prepare {_version()}",
        "images": img_meta, "images_missing": images_missing,
        "notes": read.notes,
    }
    meta.update(read.meta)
    if src.resolve() == paths.sample_source_dir().resolve():
        meta["notes"].append("the bundled synthetic sample: numbers on it are not comparable to "
                             "the paper")
    source_label = f"{src} ({layout})"
    # validate before touching the output folder (write_prepared validates again)
    mentions, entities = read.mentions, read.entities
    datasets.validate(mentions, entities, source=source_label, candidates=read.candidates)
    # ---- write: images/ first (old one kept aside), then the tables; undo everything on failure
    created = not out.exists()
    target = out / "images"
    backup: Path | None = None
    placed = False
    try:
        out.mkdir(parents=True, exist_ok=True)
        if action is not None:
            if target.exists() or target.is_symlink():
                backup = out / f".images-old-{uuid.uuid4().hex[:8]}"
                os.rename(target, backup)
            if action == "symlink":
                os.symlink(root_abs, target, target_is_directory=True)
            else:
                stage = out / f".images-new-{uuid.uuid4().hex[:8]}"
                try:
                    for rel in tqdm(to_copy, desc="copy images", unit="file"):
                        dst = stage / rel
                        dst.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(root_abs / rel, dst)
                    stage.mkdir(exist_ok=True)
                    os.rename(stage, target)
                except BaseException:
                    shutil.rmtree(stage, ignore_errors=True)
                    raise
            placed = True
        datasets.write_prepared(out, mentions, entities, meta, candidates=read.candidates,
                                source=source_label)
    except BaseException:
        if placed:
            _remove(target)
        if backup is not None:
            os.rename(backup, target)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if backup is not None:
        _remove(backup)
    elif action is None and target.is_symlink():
        target.unlink()  # a link left by an earlier prepare of this name that no longer applies
    return PrepareResult(dataset=key, root=out, meta=meta)


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
    if cand:
        lines.append(f"  candidates: {cand['mentions_with_list']} lists from {cand['file']} "
                     f"({cand['mentions_without_list']} mentions without one, "
                     f"{cand['unknown_qids_dropped']} unknown ids dropped)")
    for note in meta.get("notes", []):
        lines.append(f"  note: {note}")
    return "\n".join(lines)


#: The command line: ``dimkit prepare SRC --name NAME`` takes the flags of :class:`PrepareConfig`.
CONFIG = PrepareConfig
