"""Tiny sources built exactly like the released files (field names, nesting, file names).

Used by tests/test_prepare.py; each builder returns the path to hand to ``dimkit prepare``.
"""
from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def image(path: Path, color: tuple[int, int, int] = (200, 30, 30)) -> Path:
    """A real 4x4 image file (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path, format="PNG" if path.suffix == ".png" else "JPEG")
    return path


def dump(path: Path, obj, *, one_line: bool = False) -> Path:
    """json.dump as the releases do (indent=2; MIMIC's qid2id.json is a single line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if one_line else json.dumps(obj, indent=2), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# DIM release: WikiMEL (wikipedia/)

WIKI_ENTITIES = {  # qid -> (name, brief text or None)
    "Q1001": ("Ada Lovelace", "English mathematician and writer."),
    "Q1002": ("Alan Turing", "English computer scientist."),
    "Q1003": ("Grace Hopper", "American computer scientist and naval officer."),
    "Q1004": ("Tim Berners-Lee", None),  # no brief -> the release writes "None"
    "Q1005": ("Charles Babbage", "English polymath."),
    "Q5729149": ("Harry Smith", "Person of the data glitch."),
}


def wiki_records() -> dict[str, dict[str, dict]]:
    """split -> {key: record} as in train/dev/test.json of the DIM WikiMEL release."""
    def rec(sentence, mention, answer, img, name):
        return {"sentence": sentence, "mentions": mention, "answer": answer,
                "imgPath": f"wikipedia/{img}.jpg", "entities": name}
    return {
        "train": {
            "10": rec("Ada Lovelace wrote the first program.", "Ada Lovelace", "Q1001", "10", "Ada Lovelace"),
            "11": rec("Turing proposed a test.", "Turing", "Q1002", "11", "Alan Turing"),
            "12": rec("Hopper found a moth in the relay.", "Hopper", "Q1003", "12", "Grace Hopper"),
            "13": rec("Berners-Lee at CERN.", "Berners-Lee", "Q1004", "13", "Tim Berners-Lee"),
            "14": rec("Harry at the gate.", "Harry", "c", "14", "Harry Smith"),  # the glitch
            "15": rec("Babbage's engine.", "Babbage", "Q1005", "15", "Charles Babbage"),
        },
        "dev": {
            "20": rec("Turing at Bletchley.", "Turing", "Q1002", "20", "Alan Turing"),
            "21": rec("Ada and Babbage.", "Ada", "Q1001", "21", "Ada Lovelace"),
        },
        "test": {
            "30": rec("Hopper and COBOL.", "Hopper", "Q1003", "30", "Grace Hopper"),
            "31": rec("Babbage in London.", "Babbage", "Q1005", "31", "Charles Babbage"),
            "32": rec("The web by Berners-Lee.", "Berners-Lee", "Q1004", "missing", "Tim Berners-Lee"),
        },
    }


def build_dim_wiki(root: Path, *, llm: bool = False, records: dict | None = None) -> Path:
    """A DIM data root with wikipedia/ and ImgData/wikipedia/ (image 'missing.jpg' absent)."""
    folder = root / "wikipedia"
    records = records or wiki_records()
    for split, recs in records.items():
        dump(folder / f"{split}.json", recs)
    brief, fact = {}, {}
    for q, (name, text) in sorted(WIKI_ENTITIES.items()):
        fact[q] = f"{name} [SEP]. {text if text else 'None'}"
        brief[q] = f"{name} [SEP]. LLM: {name} is notable." if llm else fact[q]
    dump(folder / "brief.json", brief)
    if llm:
        dump(folder / "fact.json", fact)
    dump(folder / "qids_ordered.json", sorted(WIKI_ENTITIES))
    dump(folder / "ne2qid.json", {name: q for q, (name, _) in WIKI_ENTITIES.items()})
    mentions = sorted({r["mentions"] for recs in records.values() for r in recs.values()})
    dump(folder / "search_top100.json",
         {m: ["Q1002", "Q1001", "Q1003", "Q9999"] for m in mentions})  # Q9999: not in the KB
    for recs in records.values():
        for r in recs.values():
            if "missing" not in r["imgPath"]:
                image(root / "ImgData" / r["imgPath"])
    return root


# ---------------------------------------------------------------------------------------------
# DIM release: RichpediaMEL (richpedia/), keyed by qid, no dev.json

RICH_ENTITIES = {f"Q{200 + i}": f"Entity {i}" for i in range(12)}


def build_dim_rich(root: Path) -> Path:
    """A DIM data root with richpedia/ (train+test only) and ImgData/richpedia/images/."""
    folder = root / "richpedia"
    keys = sorted(RICH_ENTITIES)
    train, test = {}, {}
    for i, q in enumerate(keys):
        rec = {"sentence": f"A sentence about {RICH_ENTITIES[q]}.", "mentions": RICH_ENTITIES[q],
               "answer": q, "entities": RICH_ENTITIES[q],
               "img_list": [f"{q}_0.png", f"{q}_1.jpg", f"{q}_2.JPG"]}
        if i == 0:
            del rec["img_list"]  # 83 records of the release have none
        (train if i < 10 else test)[q] = rec
        for name in rec.get("img_list", []):
            if name.lower().endswith(".jpg"):
                image(root / "ImgData" / "richpedia" / "images" / name)
    dump(folder / "train.json", train)
    dump(folder / "test.json", test)
    dump(folder / "brief.json", {q: f"{n} [SEP]. Description of {n}." for q, n in RICH_ENTITIES.items()})
    dump(folder / "qids_ordered.json", keys)
    dump(folder / "ne2qid.json", {n: q for q, n in RICH_ENTITIES.items()})
    dump(folder / "search_top100.json", {n: keys[:5] for n in RICH_ENTITIES.values()})
    return root


# ---------------------------------------------------------------------------------------------
# DIM release: WikiDiverse (wikidiverse/), JSON lists, valid.json

DIVERSE_ENTITIES = {
    "Barack Obama": "44th president of the United States.",
    "Michelle Obama": "Lawyer and author.",
    "Chicago": "City in Illinois.",
    "Chicago Bulls": "Basketball team.",
}


def diverse_record(mention: str, entity: str | None, img: str | None, mtype: str = "Person") -> dict:
    """One WikiDiverse record as written by DIM's generate_detaset."""
    return {"sentence": f"News: {mention} was there.", "mention": mention, "mention_type": mtype,
            "mention_image": img, "entity": entity,
            "entity_image_list": ["https://upload.wikimedia.org/x.jpg"],
            "entity_introduction": None,
            "cands": [[e, []] for e in DIVERSE_ENTITIES if e != entity][:2],
            "topic": "politics", "start": 6, "end": 6 + len(mention)}


def build_dim_diverse(root: Path, *, llm: bool = False) -> Path:
    """A DIM data root with wikidiverse/ (train, valid, test lists) and ImgData/wikidiverse/."""
    folder = root / "wikidiverse"
    train = [diverse_record("Obama", "Barack Obama", "a1b2.jpg"),
             diverse_record("Michelle", "Michelle Obama", "c3d4.png"),
             diverse_record("Chicago", "Chicago", None, "Location")]
    valid = [diverse_record("the Bulls", "Chicago Bulls", "e5f6.jpg", "Organization")]
    test = [diverse_record("Obama", "Barack Obama", "a1b2.jpg"),
            diverse_record("Chicago", "Chicago", "g7h8.jpg", "Location")]
    dump(folder / "train.json", train)
    dump(folder / "valid.json", valid)
    dump(folder / "test.json", test)
    dump(folder / "entity2desc.json", DIVERSE_ENTITIES)
    if llm:
        dump(folder / "brief.json", {e: f"{e} [SEP]. LLM text on {e}." for e in DIVERSE_ENTITIES})
    dump(folder / "search_top100.json",
         {e: [x for x in DIVERSE_ENTITIES if x != e] + ["Unknown Entity"] for e in DIVERSE_ENTITIES})
    for name in ("a1b2.jpg", "c3d4.png", "e5f6.jpg", "g7h8.jpg"):
        image(root / "ImgData" / "wikidiverse" / name)
    return root


# ---------------------------------------------------------------------------------------------
# MIMIC cleaned layout

MIMIC_KB = [  # (id, qid, entity_name, attr, image_list)
    (0, "Q501", "Paris", "capital of France", ["Q501_0.jpg"]),
    (1, "Q502", "Paris%20Hilton", "American media personality", []),
    (2, "Q503", "Lyon", "city in France", ["Q503_0.jpg", "Q503_1.jpg"]),
]


def build_mimic(root: Path, *, prefix: str = "RichpediaMEL", mention_folder: str = "mention_images") -> Path:
    """A MIMIC dataset folder; RichpediaMEL ships mention_images/ (the MIMIC issue #2 trap)."""
    kb = [{"id": i, "type": "entity", "entity_name": n, "attr": a, "image_list": imgs}
          for i, _, n, a, imgs in reversed(MIMIC_KB)]  # file order != id order
    dump(root / "kb_entity.json", kb)
    dump(root / "qid2id.json", {q: i for i, q, *_ in MIMIC_KB}, one_line=True)
    splits = {
        "train": [
            {"mentions": "Paris", "sentence": "Paris in spring.", "imgPath": "m_0.png", "answer": "Q501"},
            {"mentions": "Paris%20Hilton", "sentence": "Paris Hilton at a party.",
             "imgPath": "dir/m_1.jpeg", "answer": "Q502"},
            {"mentions": "Somebody", "sentence": "Somebody unknown.", "imgPath": "m_2.jpg", "answer": "nil"},
        ],
        "dev": [{"mentions": "Lyon", "sentence": "Lyon by night.", "imgPath": "", "answer": "Q503"}],
        "test": [{"mentions": "Lyon", "sentence": "Lyon and its river.", "imgPath": "m_4.jpg",
                  "answer": "Q503"}],
    }
    for split, recs in splits.items():
        dump(root / f"{prefix}_{split}.json", recs)
    for name in ("m_0.jpg", "m_1.jpg", "m_2.jpg"):  # m_4.jpg is missing on purpose
        image(root / mention_folder / name)
    for _, _, _, _, imgs in MIMIC_KB:
        for name in imgs:
            image(root / "kb_image" / name)
    return root


# ---------------------------------------------------------------------------------------------
# MELBench raw files


def build_melbench_wikidata(root: Path, n: int = 20) -> Path:
    """Wikidata-MEL.json: parallel lists (some sentences hold two mentions)."""
    data = {}
    for i in range(n):
        key = str(1000 + i)
        if i % 4 == 0:
            data[key] = {"id": key, "sentence": f"Person {i} met Person {i + 1}.",
                         "mentions": [f"Person {i}", f"Person {i + 1}"],
                         "entities": [f"Person {i} (x)", f"Person {i + 1} (x)"],
                         "answer": [f"Q{7000 + i}", f"Q{7000 + i + 1}"]}
        else:
            data[key] = {"id": key, "sentence": f"Person {i} spoke.", "mentions": [f"Person {i}"],
                         "entities": [f"Person {i} (x)"], "answer": [f"Q{7000 + i}"]}
    return dump(root / "Wikidata-MEL.json", data)


def build_melbench_richpedia(root: Path, n: int = 10) -> Path:
    """Richpedia-MEL.json: single strings, keyed by qid."""
    data = {f"Q{8000 + i}": {"id": f"Q{8000 + i}", "sentence": f"Thing {i} is here.",
                             "mentions": f"Thing {i}", "entities": f"Thing {i}", "answer": f"Q{8000 + i}"}
            for i in range(n)}
    return dump(root / "Richpedia-MEL.json", data)


def plant_outside_links(root: Path, outside: Path) -> dict[str, str]:
    """Links in a DIM WikiMEL source's ImgData/wikipedia/ (see build_dim_wiki), pointed to by records.

    ``evil.jpg`` links to a file outside the image folder, ``linked/`` to a folder outside it; both
    must never be copied or opened. ``alias.jpg`` links to another image inside the folder and is
    fine. Returns record key -> the imgPath it now has.
    """
    secret = outside / "secret.txt"
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("root:x:0:0:secret\n")
    image(outside / "elsewhere" / "15.jpg")
    folder = root / "ImgData" / "wikipedia"
    (folder / "evil.jpg").symlink_to(secret)
    (folder / "linked").symlink_to(outside / "elsewhere", target_is_directory=True)
    (folder / "alias.jpg").symlink_to("12.jpg")
    paths = {"13": "wikipedia/evil.jpg", "15": "wikipedia/linked/15.jpg", "12": "wikipedia/alias.jpg"}
    split = root / "wikipedia" / "train.json"
    records = json.loads(split.read_text())
    for key, img in paths.items():
        records[key]["imgPath"] = img
    dump(split, records)
    return paths
