"""The bundled synthetic sample: a deterministic generator in DIM's release layout (notebook ``00_data``).

``build_sample()`` writes ``dimkit/data/sample/source/`` exactly as the WikiMEL release of DIM is laid out
(``wikipedia/{train,dev,test}.json``, ``brief.json``, ``qids_ordered.json``, ``ne2qid.json``,
``search_top100.json``, ``ImgData/wikipedia/<id>.png``), plus the stored answers later stages replay
offline (``llm_answers.json`` for ``sample+``, ``expert_cues.json`` for the BLIP-2 expert).

Everything is fictional and designed so that the claims of the paper can be *shown*, not measured:
several entities share each surface name (the mention text alone is ambiguous), each entity has a
visual signature that its mention images carry (the image resolves the ambiguity), the original
descriptions are generic, and the synthetic "LLM" answers name the entity's kind and signature, the
same words the synthetic expert cues use. Same seed, same bytes: ``python -m dimkit_dev.sample --check``
proves it (``make sample`` regenerates it).
"""
from __future__ import annotations

import argparse
import filecmp
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dimkit import atomic, paths
from dimkit.errors import DimkitError

DEFAULT_SEED = 114514
IMAGE_SIZE = 64
#: BLIP-2 prompt of the released code (``prepare_wikipedia.py::convert_caption``), two spaces included.
EXPERT_PROMPT = "Question:  Who are the characters in the picture? Answer: "
ORACLE = "sample-oracle"
LLM_TEMPLATE = "who-is"

# Colours as words: the same word is used by the drawing, the LLM answer and the expert cue.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 30, 30), "orange": (240, 140, 20), "yellow": (240, 215, 40),
    "green": (40, 160, 60), "blue": (40, 80, 200), "purple": (130, 50, 170),
    "pink": (240, 130, 180), "brown": (120, 70, 30), "grey": (128, 128, 128),
    "white": (245, 245, 245), "black": (20, 20, 20), "teal": (20, 150, 150),
}
BACKGROUNDS = ("blue", "green", "grey", "yellow", "white", "black", "teal", "brown")
SHAPE_COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black",
                 "teal")
SKIN = (225, 185, 150)

#: Entity kinds. Entities sharing a name always differ in kind, so the drawn shape alone tells them apart.
KINDS = ("person", "town", "ship", "band", "mountain", "company", "painting")

# 26 invented surface names, each shared by 3 or 4 entities, and 12 names used once: 103 entities,
# a few more than the 100 candidates of search_top100, so the lists are cut as in the real data.
SHARED_NAMES = (
    "Aldermere", "Brakenholt", "Callowmere", "Dunvarra", "Esmerin", "Farrowdale", "Glenmirth",
    "Halvarde", "Ismereth", "Jorvande", "Kestrelmoor", "Lunvale", "Morrowick", "Norhaven",
    "Orvessa", "Pellmarsh", "Quenmoor", "Rathvellin", "Selwyth", "Tormaine", "Ulvaren",
    "Vessendor", "Wrenhollow", "Yarrowmere", "Zentharo", "Thistlecombe",
)
UNIQUE_NAMES = ("Amberlyn Koss", "Brisgault", "Corvane Isle", "Delmarrow", "Eskerfield",
                "Fennimore Vale", "Gorsewick", "Hollin Tarn", "Ivorn Quay", "Jessamy Roe",
                "Kilbarrow", "Larchmere Reach")

# Original descriptions: generic on purpose. None of them names a kind, a colour or a shape.
ORIGINAL_DESCRIPTIONS = (
    "{name} is a notable entity.",
    "{name} is mentioned in several sources.",
    "{name} has an entry in this knowledge base.",
    "{name} is referred to by this name in many documents.",
    "{name} appears in a number of records.",
    "Little is recorded about {name}.",
    "{name} is a subject of some interest.",
)
#: How many entities get the literal brief "None", as WikiMEL entities without a Wikipedia brief do.
N_NONE_BRIEFS = 2

NEUTRAL_SENTENCES = (
    "A photo of {m} taken last spring.",
    "{m} appears in this picture from the archive.",
    "Another look at {m}.",
    "This image of {m} was shared widely online.",
    "{m}, as seen in a recent photograph.",
    "We finally got to see {m} up close.",
    "Here is {m} again.",
    "{m} in the picture above.",
    "An old snapshot of {m}.",
    "Everyone was talking about {m} that week.",
    "The caption simply reads {m}.",
    "Yesterday's front page featured {m}.",
)
HINT_SENTENCES: dict[str, tuple[str, ...]] = {
    "person": ("{m} gave an interview after the exhibition opened.",
               "{m} thanked the audience and smiled for the cameras."),
    "town": ("We spent a weekend in {m} by the harbour.",
             "The streets of {m} were full of visitors for the festival."),
    "ship": ("{m} left port early on Tuesday morning.",
             "The crew of {m} waved from the deck."),
    "band": ("{m} played their new songs to a full hall.",
             "Tickets for the {m} concert sold out in an hour."),
    "mountain": ("Climbers reached the summit of {m} before noon.",
                 "Snow closed the trails on {m} again."),
    "company": ("Shares of {m} rose after the announcement.",
                "{m} opened a new office and hired forty staff."),
    "painting": ("{m} is on loan to the city museum this year.",
                 "Restorers cleaned the varnish of {m} last winter."),
}
HINT_FRACTION = 0.2
WRONG_CUE_FRACTION = 0.1

_PLACES = ("the northern valleys", "the coastal provinces", "the eastern plains", "the river delta",
           "the southern islands", "the high moors")
_OCCUPATIONS = ("painter", "cellist", "chess player", "novelist", "cyclist", "botanist", "architect",
                "stage actor")
_SHIP_TYPES = ("cargo ship", "ferry", "research vessel", "sailing yacht", "fishing trawler")
_GENRES = ("folk", "rock", "jazz", "electronic", "choral")
_RANGES = ("the Grey Spine range", "the Ashen Teeth", "the Lantern Peaks", "the Hollow Crowns")
_INDUSTRIES = ("software", "shipping", "textile", "brewing", "toy", "insurance")
_STYLES = ("landscape", "abstract", "still-life", "allegorical")


@dataclass(frozen=True)
class Signature:
    """What an entity looks like: kind (drawn shape), background, shape colour, stripes."""

    kind: str
    background: str
    colour: str
    striped: bool


@dataclass
class SampleEntity:
    """One fictional KB entity of the sample."""

    qid: str
    name: str
    signature: Signature
    original: str  # description after "[SEP]. " in brief.json ("None" when missing)
    answer: str  # the synthetic LLM answer


@dataclass
class SampleCheck:
    """Result of comparing a sample folder with a fresh build."""

    identical: list[str] = field(default_factory=list)
    pixel_equal: list[str] = field(default_factory=list)  # same pixels, other compressor bytes
    different: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the fresh build, not in the folder
    extra: list[str] = field(default_factory=list)  # in the folder, not in the fresh build

    @property
    def ok(self) -> bool:
        """True when every file matches (bytes, or pixels for re-compressed images)."""
        return not (self.different or self.missing or self.extra)


# --------------------------------------------------------------------------------------------
# content


def _signature_phrase(sig: Signature) -> tuple[str, str]:
    """(LLM-answer phrase, expert-cue phrase) for a signature; they share colour and object words."""
    bg = f"striped {sig.background}" if sig.striped else sig.background
    c = sig.colour
    a_c, a_bg = _a(c), _a(bg)  # "an orange ring", "a striped grey sky"
    return {
        "person": (f"usually photographed in {a_c} coat against {a_bg} wall",
                   f"a person in {a_c} coat in front of {a_bg} wall"),
        "town": (f"known for its {c} lighthouse tower standing against {a_bg} sky",
                 f"{a_c} tower against {a_bg} sky"),
        "ship": (f"with {a_c} hull and sail, usually seen on {bg} water",
                 f"{a_c} boat on {bg} water"),
        "band": (f"whose logo is {a_c} star on {a_bg} background",
                 f"{a_c} star on {a_bg} background"),
        "mountain": (f"whose {c} peak is pictured under {a_bg} sky",
                     f"{a_c} mountain under {a_bg} sky"),
        "company": (f"whose logo is {a_c} ring on {a_bg} background",
                    f"{a_c} ring on {a_bg} background"),
        "painting": (f"showing {a_c} diamond on {a_bg} canvas",
                     f"{a_c} diamond on {a_bg} canvas"),
    }[sig.kind]


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _answer(name: str, sig: Signature, rng: np.random.Generator) -> str:
    """The synthetic 'LLM' description: kind, one invented fact and the visual signature."""
    look, _ = _signature_phrase(sig)
    year = int(rng.integers(1890, 2021))

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    if sig.kind == "person":
        return (f"{name} is a fictional {pick(_OCCUPATIONS)} from {pick(_PLACES)}, born in "
                f"{year - 40}, {look}.")
    if sig.kind == "town":
        return (f"{name} is a fictional harbour town in {pick(_PLACES)} with about "
                f"{int(rng.integers(2, 90)) * 1000} inhabitants, {look}.")
    if sig.kind == "ship":
        return f"{name} is a fictional {pick(_SHIP_TYPES)} launched in {year}, {look}."
    if sig.kind == "band":
        return f"{name} is a fictional {pick(_GENRES)} band formed in {year}, {look}."
    if sig.kind == "mountain":
        return (f"{name} is a fictional mountain of {int(rng.integers(12, 48)) * 100} metres in "
                f"{pick(_RANGES)}, {look}.")
    if sig.kind == "company":
        return f"{name} is a fictional {pick(_INDUSTRIES)} company founded in {year}, {look}."
    return f"{name} is a fictional {pick(_STYLES)} painting from {year}, {look}."


def _make_entities(rng: np.random.Generator) -> list[SampleEntity]:
    """Draw names, kinds and unique signatures; entities sharing a name differ in kind and colours."""
    groups: list[list[str]] = []  # kinds per name
    sizes = rng.permutation([4] * 13 + [3] * (len(SHARED_NAMES) - 13))
    for size in sizes:
        groups.append([KINDS[i] for i in rng.choice(len(KINDS), size=int(size), replace=False)])
    groups += [[KINDS[int(rng.integers(len(KINDS)))]] for _ in UNIQUE_NAMES]
    names = list(SHARED_NAMES) + list(UNIQUE_NAMES)

    used: set[Signature] = set()
    drafts: list[tuple[str, Signature]] = []
    for name, kinds in zip(names, groups):
        bgs: set[str] = set()
        cols: set[str] = set()
        for kind in kinds:
            while True:  # rejection sampling; the space (8 x 10 x 2 per kind) is far from full
                bg = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
                col = SHAPE_COLOURS[int(rng.integers(len(SHAPE_COLOURS)))]
                sig = Signature(kind, bg, col, bool(rng.random() < 0.3))
                if col != bg and bg not in bgs and col not in cols and sig not in used:
                    break
            used.add(sig)
            bgs.add(bg)
            cols.add(col)
            drafts.append((name, sig))

    # QIDs are handed out in shuffled order so their sort order says nothing about the name groups.
    order = rng.permutation(len(drafts))
    none_briefs = set(rng.choice(len(drafts), size=N_NONE_BRIEFS, replace=False).tolist())
    entities = []
    for rank, i in enumerate(order):
        name, sig = drafts[int(i)]
        if rank in none_briefs:
            original = "None"
        else:
            original = ORIGINAL_DESCRIPTIONS[int(rng.integers(len(ORIGINAL_DESCRIPTIONS)))].format(
                name=name)
        entities.append(SampleEntity(qid=f"Q{9000001 + rank}", name=name, signature=sig,
                                     original=original, answer=_answer(name, sig, rng)))
    return entities


@dataclass
class _Mention:
    key: str
    entity: SampleEntity
    split: str
    sentence: str
    image_name: str  # file name under ImgData/wikipedia/
    plant: str | None = None  # which awkward image is planted here, if any


# The awkward images the image report must find: (plant, split, file extension).
PLANTED = (
    ("missing", "train", "png"),
    ("empty", "train", "png"),
    ("truncated", "test", "png"),
    ("corrupt", "train", "png"),
    ("palette", "train", "png"),
    ("animated_gif", "train", "gif"),
    ("cmyk_jpeg", "test", "jpg"),
    ("gray16", "train", "png"),
    ("alpha", "dev", "png"),
)
UNUSABLE_PLANTS = ("missing", "empty", "truncated", "corrupt")


def _make_mentions(entities: list[SampleEntity], rng: np.random.Generator,
                   n_mentions: int) -> list[_Mention]:
    """Mentions per entity (skewed), splits 60/15/25 with every entity seen in train, sentences."""
    base = 4
    if n_mentions < base * len(entities):
        raise DimkitError(f"n_mentions must be at least {base * len(entities)}")
    weights = rng.dirichlet(np.full(len(entities), 2.0))
    counts = base + rng.multinomial(n_mentions - base * len(entities), weights)

    owners = [e for e, n in zip(entities, counts) for _ in range(int(n))]
    first = set(np.cumsum([0] + [int(n) for n in counts[:-1]]).tolist())
    # The first mention of each entity goes to train, so dev/test entities are all seen in training.
    rest = [i for i in range(len(owners)) if i not in first]
    rest = [rest[int(j)] for j in rng.permutation(len(rest))]
    n_dev, n_test = round(0.15 * len(owners)), round(0.25 * len(owners))
    split = ["train"] * len(owners)
    for j, i in enumerate(rest):
        if j < n_dev:
            split[i] = "dev"
        elif j < n_dev + n_test:
            split[i] = "test"

    # Keys are handed out in shuffled order so splits interleave in key space, as in the release.
    order = rng.permutation(len(owners))
    mentions = []
    for rank, i in enumerate(order):
        e = owners[int(i)]
        if rng.random() < HINT_FRACTION:
            options = HINT_SENTENCES[e.signature.kind]
        else:
            options = NEUTRAL_SENTENCES
        sentence = options[int(rng.integers(len(options)))].format(m=e.name)
        key = f"{rank + 1:05d}"
        mentions.append(_Mention(key=key, entity=e, split=split[int(i)], sentence=sentence,
                                 image_name=f"{key}.png"))
    mentions.sort(key=lambda m: m.key)

    # Plant the awkward images on mentions whose entity keeps at least two other train mentions.
    train_per_entity: dict[str, int] = {}
    for m in mentions:
        if m.split == "train":
            train_per_entity[m.entity.qid] = train_per_entity.get(m.entity.qid, 0) + 1
    taken: set[str] = set()
    for plant, want_split, ext in PLANTED:
        pool = [m for m in mentions if m.split == want_split and m.plant is None
                and m.entity.qid not in taken and train_per_entity[m.entity.qid] >= 3]
        m = pool[int(rng.integers(len(pool)))]
        m.plant = plant
        m.image_name = f"{m.key}.{ext}"
        taken.add(m.entity.qid)
    return mentions


# --------------------------------------------------------------------------------------------
# images


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, ...]:
    return tuple(int(np.clip(v + rng.integers(-amount, amount + 1), 0, 255)) for v in rgb)


def draw_signature(sig: Signature, rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    """One mention image: the entity's signature with jittered position, scale, colours and noise."""
    bg = _jitter(COLOURS[sig.background], rng, 12)
    fg = _jitter(COLOURS[sig.colour], rng, 12)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    if sig.striped:
        # Darker horizontal bands, 8 px period: "striped" in the answer and the cue.
        band = tuple(int(v * 0.7) for v in bg)
        phase = int(rng.integers(0, 8))
        for y in range(-8 + phase, size, 8):
            d.rectangle([0, y, size, y + 3], fill=band)
    s = size * float(rng.uniform(0.55, 0.75))  # the shape's box side
    cx = size / 2 + float(rng.uniform(-6, 6))
    cy = size / 2 + float(rng.uniform(-6, 6))
    x0, y0, x1, y1 = cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2

    def P(fx: float, fy: float) -> tuple[float, float]:
        return (x0 + fx * s, y0 + fy * s)

    if sig.kind == "person":
        d.ellipse([P(0.35, 0.0), P(0.65, 0.3)], fill=SKIN)
        d.polygon([P(0.3, 0.32), P(0.7, 0.32), P(0.85, 1.0), P(0.15, 1.0)], fill=fg)
    elif sig.kind == "town":
        d.rectangle([P(0.35, 0.3), P(0.65, 1.0)], fill=fg)
        d.polygon([P(0.25, 0.32), P(0.5, 0.0), P(0.75, 0.32)], fill=fg)
    elif sig.kind == "ship":
        d.polygon([P(0.0, 0.65), P(1.0, 0.65), P(0.8, 0.95), P(0.2, 0.95)], fill=fg)
        d.polygon([P(0.5, 0.0), P(0.5, 0.6), P(0.15, 0.6)], fill=fg)
    elif sig.kind == "band":
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.2
            a = -np.pi / 2 + k * np.pi / 5
            pts.append(P(0.5 + r * float(np.cos(a)), 0.5 + r * float(np.sin(a))))
        d.polygon(pts, fill=fg)
    elif sig.kind == "mountain":
        d.polygon([P(0.0, 1.0), P(0.5, 0.05), P(1.0, 1.0)], fill=fg)
    elif sig.kind == "company":
        d.ellipse([P(0.05, 0.05), P(0.95, 0.95)], outline=fg, width=max(3, int(s * 0.16)))
    else:  # painting
        d.polygon([P(0.5, 0.0), P(1.0, 0.5), P(0.5, 1.0), P(0.0, 0.5)], fill=fg)

    # Blocky noise (8x8 blocks) so images differ pixel-wise yet PNG still compresses well.
    arr = np.asarray(img, dtype=np.int16)
    blocks = rng.integers(-5, 6, size=(size // 8, size // 8, 1))
    arr = arr + np.kron(blocks, np.ones((8, 8, 1), dtype=np.int16))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _png_bytes(img: Image.Image, compress_level: int = 9) -> bytes:
    buf = io.BytesIO()
    # No pnginfo, no optimize: PIL then writes no timestamp or text chunk, so bytes are reproducible.
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _image_bytes(m: _Mention, rng: np.random.Generator) -> bytes | None:
    """File content of a mention image (None: the file is referenced but not written)."""
    img = draw_signature(m.entity.signature, rng)
    if m.plant is None:
        return _png_bytes(img)
    if m.plant == "missing":
        return None
    if m.plant == "empty":
        return b""
    if m.plant == "truncated":
        # Stored (level 0) deflate has no compressor choices, so the cut is the same on any zlib.
        full = _png_bytes(img, compress_level=0)
        return full[: len(full) // 2]
    if m.plant == "corrupt":
        return rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes()
    if m.plant == "palette":
        return _png_bytes(img.quantize(colors=16, method=Image.Quantize.MEDIANCUT,
                                       dither=Image.Dither.NONE))
    if m.plant == "animated_gif":
        second = draw_signature(m.entity.signature, rng)
        frames = [f.quantize(colors=32, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
                  for f in (img, second)]
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=300,
                       loop=0)
        return buf.getvalue()
    if m.plant == "cmyk_jpeg":
        buf = io.BytesIO()
        img.convert("CMYK").save(buf, format="JPEG", quality=90)
        return buf.getvalue()
    if m.plant == "gray16":
        gray = np.asarray(img.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
        return _png_bytes(Image.fromarray(gray.astype(np.uint16)))
    if m.plant == "alpha":
        rgba = img.convert("RGBA")
        a = np.asarray(rgba).copy()
        a[:8, :, 3] = 0  # a transparent top band, so the alpha channel matters
        return _png_bytes(Image.fromarray(a))
    raise AssertionError(m.plant)


# --------------------------------------------------------------------------------------------
# cues and candidates


def _cue(m: _Mention, group: list[SampleEntity], rng: np.random.Generator) -> str:
    """The synthetic expert answer for one image; about 10% are wrong or unhelpful, as real ones are."""
    if rng.random() < WRONG_CUE_FRACTION:
        kind = int(rng.integers(3))
        others = [e for e in group if e.qid != m.entity.qid]
        if kind == 0 and others:
            # Misleading: the look of another entity with the same name.
            return _signature_phrase(others[int(rng.integers(len(others)))].signature)[1]
        if kind <= 1:
            return ("i don't know", "unknown", "nothing")[int(rng.integers(3))]
        return ("a picture", "a photo of something", "a logo", "a drawing")[int(rng.integers(4))]
    return _signature_phrase(m.entity.signature)[1]


def search_top100(mentions: list[str], name_to_qids: dict[str, list[str]], k: int = 100
                  ) -> dict[str, list[str]]:
    """DIM's ``search_top100.json``: names ranked by fuzzy WRatio, each expanded to all its qids."""
    from rapidfuzz import fuzz, process, utils

    names = sorted(name_to_qids)
    out: dict[str, list[str]] = {}
    for mention in sorted(set(mentions)):
        scored = process.extract(mention, names, scorer=fuzz.WRatio, processor=utils.default_process,
                                 limit=None)
        # Ties broken by name so the order never depends on the scorer's internals.
        ranked = sorted(scored, key=lambda t: (-round(float(t[1]), 6), t[0]))
        qids: list[str] = []
        for name, _, _ in ranked:
            qids.extend(name_to_qids[name])
        out[mention] = qids[:k]
    return out


# --------------------------------------------------------------------------------------------
# writing


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _plan(seed: int, n_mentions: int) -> tuple[list[SampleEntity], list[_Mention]]:
    rng = np.random.default_rng(seed)
    entities = _make_entities(rng)
    return entities, _make_mentions(entities, rng, n_mentions)


def planted_images(*, seed: int = DEFAULT_SEED, n_mentions: int = 700) -> dict[str, str]:
    """Which awkward image sits where: plant name -> imgPath (relative to ImgData)."""
    _, mentions = _plan(seed, n_mentions)
    return {m.plant: f"wikipedia/{m.image_name}" for m in mentions if m.plant}


def _write_tree(root: Path, *, seed: int, n_mentions: int) -> None:
    entities, mentions = _plan(seed, n_mentions)
    by_name: dict[str, list[SampleEntity]] = {}
    for e in entities:
        by_name.setdefault(e.name, []).append(e)
    for group in by_name.values():
        group.sort(key=lambda e: e.qid)

    wiki = root / "wikipedia"
    img_dir = root / "ImgData" / "wikipedia"
    wiki.mkdir(parents=True)
    img_dir.mkdir(parents=True)

    # Images and cues use their own generators, so editing one part leaves the others' bytes alone.
    img_rng = np.random.default_rng([seed, 1])
    cue_rng = np.random.default_rng([seed, 2])
    cues: dict[str, str] = {}
    for m in mentions:
        data = _image_bytes(m, img_rng)
        rel = f"wikipedia/{m.image_name}"
        if data is not None:
            (img_dir / m.image_name).write_bytes(data)
        cue = _cue(m, by_name[m.entity.name], cue_rng)
        # The expert cannot answer for an image nobody can open: no stored cue for those.
        if m.plant not in UNUSABLE_PLANTS:
            cues[rel] = cue

    for split in ("train", "dev", "test"):
        records = {m.key: {"sentence": m.sentence, "mentions": m.entity.name,
                           "answer": m.entity.qid, "imgPath": f"wikipedia/{m.image_name}",
                           "entities": m.entity.name}
                   for m in mentions if m.split == split}
        (wiki / f"{split}.json").write_bytes(_json_bytes(records))

    (wiki / "brief.json").write_bytes(_json_bytes(
        {e.qid: f"{e.name} [SEP]. {e.original}" for e in entities}))
    (wiki / "qids_ordered.json").write_bytes(_json_bytes(sorted(e.qid for e in entities)))
    # As the released build_text.py does: one qid per name, the last sample wins. With shared names
    # this loses entities, which is the real data's limitation too; readers take names from brief.json.
    ne2qid: dict[str, str] = {}
    for split in ("train", "dev", "test"):
        for m in mentions:
            if m.split == split:
                ne2qid[m.entity.name] = m.entity.qid
    (wiki / "ne2qid.json").write_bytes(_json_bytes(ne2qid))
    name_to_qids = {n: [e.qid for e in g] for n, g in by_name.items()}
    (wiki / "search_top100.json").write_bytes(_json_bytes(
        search_top100([m.entity.name for m in mentions], name_to_qids)))

    (root / "llm_answers.json").write_bytes(_json_bytes({
        "model": ORACLE, "template": LLM_TEMPLATE,
        "note": ("synthetic answers written by dimkit_dev.sample, not by an LLM: each names the "
                 "fictional entity's kind and visual signature"),
        "answers": {e.qid: e.answer for e in entities},
    }))
    (root / "expert_cues.json").write_bytes(_json_bytes({
        "expert": ORACLE, "prompt": EXPERT_PROMPT,
        "note": ("synthetic cues written by dimkit_dev.sample from each image's drawing recipe, not by "
                 "BLIP-2; about 10% are deliberately wrong or unhelpful; unreadable images have none"),
        "cues": cues,
    }))


def _looks_like_sample(path: Path) -> bool:
    try:
        return json.loads((path / "llm_answers.json").read_text()).get("model") == ORACLE
    except (OSError, ValueError, AttributeError):
        return False


def build_sample(out_dir: str | Path | None = None, *, seed: int = DEFAULT_SEED,
                 n_mentions: int = 700) -> Path:
    """Write the synthetic sample in DIM's release layout to ``out_dir`` (default: the package's copy)."""
    out = Path(out_dir) if out_dir is not None else paths.sample_source_dir()
    out = out.resolve()
    if out.exists() and any(out.iterdir()) and not _looks_like_sample(out):
        raise DimkitError(f"{out} exists and is not a dimkit sample; refusing to replace it")
    with atomic.building(out) as stage:  # a failed build never leaves half a sample behind
        _write_tree(stage, seed=seed, n_mentions=n_mentions)
    return out


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _same_pixels(a: Path, b: Path) -> bool:
    try:
        with Image.open(a) as ia, Image.open(b) as ib:
            return (ia.mode == ib.mode and ia.size == ib.size
                    and np.array_equal(np.asarray(ia), np.asarray(ib)))
    except Exception:  # noqa: BLE001 - unreadable on either side means not provably equal
        return False


def check_sample(path: str | Path | None = None, *, seed: int = DEFAULT_SEED,
                 n_mentions: int = 700) -> SampleCheck:
    """Compare a sample folder with a fresh build: byte-identical, or same pixels for images."""
    root = Path(path) if path is not None else paths.sample_source_dir()
    result = SampleCheck()
    if not root.is_dir():
        raise DimkitError(f"no sample at {root}; build it with `make sample`")
    with tempfile.TemporaryDirectory(prefix="dimkit-sample-check-") as tmp:
        fresh = build_sample(Path(tmp) / "source", seed=seed, n_mentions=n_mentions)
        want, have = _files(fresh), _files(root)
        result.missing = sorted(want - have)
        result.extra = sorted(have - want)
        for rel in sorted(want & have):
            if filecmp.cmp(fresh / rel, root / rel, shallow=False):
                result.identical.append(rel)
            elif rel.endswith(".png") and _same_pixels(fresh / rel, root / rel):
                # Another zlib (e.g. zlib-ng in newer Pillow wheels) compresses the same pixels
                # to other bytes; that is not a content change.
                result.pixel_equal.append(rel)
            else:
                result.different.append(rel)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m dimkit_dev.sample [--out DIR] [--check] [--seed N]``: regenerate or check the sample."""
    parser = argparse.ArgumentParser(prog="python -m dimkit_dev.sample", description=main.__doc__)
    parser.add_argument("--out", type=Path, default=None,
                        help="folder to write (default: the package's dimkit/data/sample/source)")
    parser.add_argument("--check", action="store_true",
                        help="do not write; verify the folder equals a fresh build")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    args = parser.parse_args(argv)
    if args.check:
        res = check_sample(args.out, seed=args.seed)
        print(f"identical: {len(res.identical)}  same pixels, other bytes: {len(res.pixel_equal)}  "
              f"different: {len(res.different)}  missing: {len(res.missing)}  extra: {len(res.extra)}")
        for label, items in (("different", res.different), ("missing", res.missing),
                             ("extra", res.extra)):
            for rel in items[:20]:
                print(f"  {label}: {rel}")
        if not res.ok:
            print("the sample differs from a fresh build; regenerate it with `make sample`")
            return 1
        print("the sample matches a fresh build")
        return 0
    out = build_sample(args.out, seed=args.seed)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({len(_files(out))} files, {size / 1e6:.2f} MB, seed {args.seed})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
