"""The bundled synthetic sample: deterministic, committed as built, in DIM's layout, and ambiguous by design."""
from __future__ import annotations

import filecmp
import json
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dimkit import paths
from dimkit_dev import sample
from dimkit.errors import DimkitError

SPLITS = ("train", "dev", "test")
STOP = {"a", "an", "the", "on", "in", "of", "with", "against", "under", "front", "its", "is", "and",
        "whose", "usually", "seen", "known", "for", "standing", "pictured", "showing", "from"}
KIND_WORDS = {"person", "coat", "town", "tower", "lighthouse", "ship", "boat", "hull", "band", "star",
              "mountain", "peak", "company", "ring", "painting", "diamond", "canvas", "striped"}


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower())) - STOP


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return sample.build_sample(tmp_path_factory.mktemp("a") / "source")


@pytest.fixture(scope="module")
def src(built: Path) -> dict:
    wiki = built / "wikipedia"
    splits = {s: json.loads((wiki / f"{s}.json").read_text()) for s in SPLITS}
    brief = json.loads((wiki / "brief.json").read_text())
    return {
        "root": built,
        "splits": splits,
        "records": [(s, k, v) for s in SPLITS for k, v in splits[s].items()],
        "brief": brief,
        "name": {q: v.split(" [SEP]. ", 1)[0] for q, v in brief.items()},
        "original": {q: v.split(" [SEP]. ", 1)[1] for q, v in brief.items()},
        "qids": json.loads((wiki / "qids_ordered.json").read_text()),
        "ne2qid": json.loads((wiki / "ne2qid.json").read_text()),
        "top100": json.loads((wiki / "search_top100.json").read_text()),
        "llm": json.loads((built / "llm_answers.json").read_text()),
        "cues": json.loads((built / "expert_cues.json").read_text()),
    }


def _groups(src: dict) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for q, n in src["name"].items():
        groups[n].append(q)
    return groups


def test_two_builds_are_byte_identical(built: Path, tmp_path: Path) -> None:
    again = sample.build_sample(tmp_path / "source")
    assert _files(built) == _files(again)
    match, mismatch, errors = filecmp.cmpfiles(built, again, _files(built), shallow=False)
    assert mismatch == [] and errors == []
    assert len(match) > 700


def test_committed_copy_matches_a_fresh_build() -> None:
    root = paths.sample_source_dir()
    assert (root / "wikipedia" / "train.json").is_file(), "dimkit/data/sample/source must be committed"
    res = sample.check_sample(root)
    assert res.ok, (res.different[:5], res.missing[:5], res.extra[:5])
    size = sum((root / f).stat().st_size for f in _files(root))
    assert size < 10 * 2**20


def test_release_layout(src: dict) -> None:
    root = src["root"]
    assert [len(src["splits"][s]) for s in SPLITS] == [420, 105, 175]
    keys = [k for _, k, _ in src["records"]]
    assert len(keys) == len(set(keys)) == 700
    for _, key, rec in src["records"]:
        assert set(rec) == {"sentence", "mentions", "answer", "imgPath", "entities"}
        assert rec["mentions"] in rec["sentence"]
        assert rec["entities"] == src["name"][rec["answer"]]
        assert re.fullmatch(rf"wikipedia/{key}\.(png|gif|jpg)", rec["imgPath"])
    assert src["qids"] == sorted(src["brief"]) == sorted(src["llm"]["answers"])
    assert all(re.fullmatch(r"Q9\d{6}", q) for q in src["qids"])
    assert all(" [SEP]. " in v for v in src["brief"].values())
    assert {r["answer"] for _, _, r in src["records"]} <= set(src["qids"])
    # ne2qid keeps one qid per name, as the released build_text.py does.
    assert set(src["ne2qid"]) == set(src["name"].values())
    assert all(src["name"][q] == n for n, q in src["ne2qid"].items())
    assert src["llm"]["model"] == src["cues"]["expert"] == "sample-oracle"
    assert src["cues"]["prompt"] == "Question:  Who are the characters in the picture? Answer: "
    planted = sample.planted_images()
    for _, _, rec in src["records"]:
        exists = (root / "ImgData" / rec["imgPath"]).is_file()
        assert exists == (rec["imgPath"] != planted["missing"]), rec["imgPath"]


def test_candidate_lists_hold_every_entity_of_the_name(src: dict) -> None:
    groups = _groups(src)
    assert len(src["qids"]) > 100  # so lists are really cut at 100
    assert set(src["top100"]) == {r["mentions"] for _, _, r in src["records"]}
    for mention, qids in src["top100"].items():
        assert len(qids) == 100 == len(set(qids))
        assert qids[: len(groups[mention])] == sorted(groups[mention])


def test_names_are_ambiguous_and_originals_do_not_tell_them_apart(src: dict) -> None:
    groups = _groups(src)
    shared = [n for n, qs in groups.items() if len(qs) >= 3]
    assert len(shared) >= 20
    ambiguous = sum(len(groups[r["mentions"]]) >= 3 for _, _, r in src["records"])
    assert ambiguous / len(src["records"]) > 0.8
    original_words = set().union(*(_words(o) for o in src["original"].values()))
    assert not original_words & (KIND_WORDS | set(sample.COLOURS))
    # Originals within a group say nothing about the entity beyond the shared name.
    templates = {t.format(name="X") for t in sample.ORIGINAL_DESCRIPTIONS} | {"None"}
    for q, o in src["original"].items():
        assert o.replace(src["name"][q], "X") in templates
    answers = src["llm"]["answers"]
    for name in shared:
        texts = [answers[q] for q in groups[name]]
        assert len(set(texts)) == len(texts)
        for q in groups[name]:
            assert _words(answers[q]) - original_words, q


def test_sentences_are_mostly_neutral(src: dict) -> None:
    neutral = {t.format(m="X") for t in sample.NEUTRAL_SENTENCES}
    share = np.mean([r["sentence"].replace(r["mentions"], "X") in neutral
                     for _, _, r in src["records"]])
    assert 0.7 < share < 0.9


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize((16, 16), Image.BILINEAR), dtype=np.float32).ravel()


def test_images_resolve_the_ambiguous_name(src: dict) -> None:
    root, groups = src["root"], _groups(src)
    planted = set(sample.planted_images().values())
    ok = lambda r: r["imgPath"].endswith(".png") and r["imgPath"] not in planted
    cents: dict[str, list[np.ndarray]] = defaultdict(list)
    for s, _, r in src["records"]:
        if s == "train" and ok(r):
            cents[r["answer"]].append(_pixels(root / "ImgData" / r["imgPath"]))
    centroid = {q: np.mean(v, axis=0) for q, v in cents.items()}
    hits = []
    for s, _, r in src["records"]:
        if s == "test" and ok(r) and len(groups[r["mentions"]]) > 1:
            x = _pixels(root / "ImgData" / r["imgPath"])
            best = min(groups[r["mentions"]], key=lambda q: np.linalg.norm(centroid[q] - x))
            hits.append(best == r["answer"])
    assert len(hits) > 100
    assert np.mean(hits) > 0.95


def test_cues_match_the_llm_answers_not_the_originals(src: dict) -> None:
    groups, answers, cues = _groups(src), src["llm"]["answers"], src["cues"]["cues"]
    by_path = {r["imgPath"]: r for _, _, r in src["records"]}

    def top1(cue: str, qids: list[str], texts: dict[str, str]) -> str | None:
        scores = {q: len(_words(cue) & _words(texts[q])) for q in qids}
        best = max(scores.values())
        winners = [q for q, v in scores.items() if v == best]
        return winners[0] if len(winners) == 1 and best > 0 else None

    plus, orig, useless = [], [], 0
    for path, cue in cues.items():
        r = by_path[path]
        qids = groups[r["mentions"]]
        if len(qids) < 2:
            continue
        plus.append(top1(cue, qids, answers) == r["answer"])
        orig.append(top1(cue, qids, src["original"]) == r["answer"])
        useless += not (_words(cue) & KIND_WORDS)
    assert 0.8 < np.mean(plus) < 0.97  # a few cues are wrong on purpose
    assert np.mean(orig) < 0.05
    assert 0.03 < useless / len(plus) < 0.12
    # Unreadable images get no cue; converted ones do.
    planted = sample.planted_images()
    for plant in sample.UNUSABLE_PLANTS:
        assert planted[plant] not in cues
    for plant in ("palette", "animated_gif", "cmyk_jpeg", "gray16", "alpha"):
        assert planted[plant] in cues


def test_planted_images_are_what_they_claim(src: dict) -> None:
    planted = sample.planted_images()
    img = lambda plant: src["root"] / "ImgData" / planted[plant]
    split_of = {r["imgPath"]: s for s, _, r in src["records"]}
    assert sorted(split_of[p] for p in planted.values()).count("train") >= 6
    assert not img("missing").exists()
    assert img("empty").stat().st_size == 0
    with pytest.raises(OSError):
        with Image.open(img("truncated")) as im:
            im.load()
    with pytest.raises(OSError):
        Image.open(img("corrupt"))
    expected = {"palette": ("P", 1), "animated_gif": ("P", 2), "cmyk_jpeg": ("CMYK", 1),
                "gray16": ("I;16", 1), "alpha": ("RGBA", 1)}
    for plant, (mode, frames) in expected.items():
        with Image.open(img(plant)) as im:
            assert (im.mode, getattr(im, "n_frames", 1)) == (mode, frames), plant


def test_check_cli_reports_a_changed_file(built: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    # The fresh build is `built` itself (determinism is tested above); this keeps the test fast.
    monkeypatch.setattr(sample, "build_sample", lambda out, **kw: Path(shutil.copytree(built, out)))
    args = ["--check", "--out", str(copy)]
    assert sample.main(args) == 0
    (copy / "wikipedia" / "brief.json").write_text("{}\n")
    (copy / "extra.txt").write_text("x")
    assert sample.main(args) == 1
    out = capsys.readouterr().out
    assert "different: wikipedia/brief.json" in out and "extra: extra.txt" in out


def test_build_refuses_to_replace_a_folder_that_is_not_a_sample(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DimkitError, match="not a dimkit sample"):
        sample.build_sample(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_reader_loads_the_sample(built: Path, tmp_path: Path, monkeypatch) -> None:
    prepare = pytest.importorskip("dimkit.prepare", reason="dimkit.prepare not written yet")
    root = prepare.run(prepare.PrepareConfig(src=built, dataset="sample", data_dir=tmp_path)).root
    from dimkit import datasets
    ds = datasets.load("sample", data_dir=tmp_path)
    assert ds.root == Path(root)
    assert ds.counts()["mentions"] == 700 and ds.counts()["entities"] == len(sample._plan(
        sample.DEFAULT_SEED, 700)[0])
    # Names come from brief.json, so every entity sharing a name keeps it.
    assert ds.entities["name"].value_counts().max() >= 3
