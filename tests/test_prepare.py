"""dimkit.prepare: every reader on fixtures built like the released files, and every bad input."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

import fixtures_prepare as fx
from dimkit import cli, datasets, paths
from dimkit.errors import DataError, DimkitError
from dimkit import prepare as prepare_mod
from dimkit.prepare import detect_layout, seeded_split


def prepare(src, name, **settings) -> Path:
    """Prepare ``src`` as ``name`` through the stage (``prepare.run``); the dataset folder."""
    return prepare_mod.run(prepare_mod.PrepareConfig(src=src, dataset=name, **settings)).root


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    out = tmp_path / "data"
    monkeypatch.setenv("DIMKIT_DATA", str(out))
    return out


def _resolve(ds: datasets.Dataset, rel) -> Path | None:
    return ds.image_path(rel)


def _present(value) -> bool:
    return isinstance(value, str)


# ---------------------------------------------------------------------------------------------
# layout detection


def test_detect_layout_of_each_source(tmp_path):
    root = fx.build_dim_wiki(tmp_path / "dim")
    assert detect_layout(root) == ("dim", "wikipedia")
    assert detect_layout(root / "wikipedia") == ("dim", "wikipedia")
    fx.build_dim_rich(root)
    assert detect_layout(root) == ("dim", None)  # two subsets: the caller must choose
    assert detect_layout(root / "richpedia") == ("dim", "richpedia")
    assert detect_layout(fx.build_mimic(tmp_path / "mimic")) == ("mimic", "RichpediaMEL")
    assert detect_layout(fx.build_melbench_wikidata(tmp_path / "mb")) == ("melbench", "Wikidata-MEL")
    assert detect_layout(fx.build_melbench_richpedia(tmp_path / "mb")) == ("melbench", "Richpedia-MEL")
    # a dataset folder with an unfamiliar name is told apart by its records
    diverse = fx.build_dim_diverse(tmp_path / "d")
    os.rename(diverse / "wikidiverse", diverse / "mydiverse")
    assert detect_layout(diverse / "mydiverse") == ("dim", "wikidiverse")
    with pytest.raises(DataError, match="cannot tell the layout"):
        detect_layout(tmp_path / "mb" / "..")
    with pytest.raises(DataError, match="source not found"):
        detect_layout(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# DIM release layout


def test_dim_wikimel(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim")
    root = prepare(src, "wikimel")
    assert root == data_dir / "wikimel"
    ds = datasets.load("wikimel")
    m = ds.mentions
    assert list(m.columns[:6]) == list(datasets.MENTION_COLUMNS)
    assert ds.counts()["mentions_train"] == 6 and ds.counts()["mentions_dev"] == 2
    assert ds.counts()["mentions_test"] == 3
    row = m.set_index("mention_id").loc["train-10"]
    assert row["split"] == "train" and row["mention"] == "Ada Lovelace" and row["qid"] == "Q1001"
    assert row["entity_name"] == "Ada Lovelace"
    # the 'c' glitch is remapped as DIM's dataset.py does, and recorded
    assert m.set_index("mention_id").loc["train-14", "qid"] == "Q5729149"
    assert ds.meta["reader"]["answer_glitches_remapped"] == 1
    assert any("Q5729149" in n for n in ds.meta["notes"])
    # images: relative, through the images/ link, resolvable; the absent one is counted
    assert row["image"] == "images/wikipedia/10.jpg"
    assert (root / "images").is_symlink()
    assert _resolve(ds, row["image"]).is_file()
    assert ds.meta["images_missing"] == 1
    assert not _resolve(ds, m.set_index("mention_id").loc["test-32", "image"]).exists()
    # entities: KB = qids_ordered.json; names from ne2qid; brief text after "[SEP]. "; "None" -> None
    e = ds.entities.set_index("qid")
    assert list(ds.entities["qid"]) == sorted(fx.WIKI_ENTITIES)
    assert e.loc["Q1002", "name"] == "Alan Turing"
    assert e.loc["Q1002", "description"] == "English computer scientist."
    assert e.loc["Q1004", "description"] is None or pd.isna(e.loc["Q1004", "description"])
    assert e.loc["Q1002", "description_source"] == "wikipedia (released)"
    assert e.loc["Q1004", "description_source"] == "none"
    assert list(e.loc["Q1001", "images"]) == []
    # candidates from search_top100.json, one list per mention, unknown qids dropped and counted
    c = ds.candidates.set_index("mention_id")
    assert len(c) == len(m)
    assert list(c.loc["dev-20", "qids"]) == ["Q1002", "Q1001", "Q1003"]
    assert ds.meta["candidates"]["source"] == "release"
    assert ds.meta["candidates"]["unknown_qids_dropped"] == 1
    # meta
    assert ds.meta["layout"] == "dim" and ds.meta["subset"] == "wikipedia"
    assert ds.meta["dataset"] == "wikimel" and ds.meta["seed"] == 114514
    assert ds.meta["source"] == str(src)


def test_dim_dataset_folder_as_source_finds_imgdata_beside_it(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim") / "wikipedia"
    ds = datasets.load(prepare(src, "w").name)
    assert ds.meta["images"]["root"] == str((tmp_path / "dim" / "ImgData").resolve())
    assert ds.image_path(ds.mentions["image"].iloc[0]).is_file()


def test_dim_wiki_plus_has_llm_and_original_descriptions(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim", llm=True)
    root = prepare(src, "wiki+")
    assert root.name == "wikimel+"
    ds = datasets.load("wiki+")
    e = ds.entities.set_index("qid")
    assert e.loc["Q1001", "description"] == "LLM: Ada Lovelace is notable."
    assert e.loc["Q1001", "description_source"] == "llm (released)"
    assert e.loc["Q1001", "description_original"] == "English mathematician and writer."
    assert ds.meta["description_source"] == "llm (released)"


def test_dim_plus_without_brief_is_an_error(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim")
    (src / "wikipedia" / "brief.json").unlink()
    with pytest.raises(DataError, match="brief.json") as err:
        prepare(src, "wikimel+")
    assert err.value.file.endswith("brief.json")
    # without '+', brief.json is optional (descriptions then absent, noted)
    ds = datasets.load(prepare(src, "wikimel").name)
    assert ds.entities["description"].isna().all()


def test_dim_richpedia_carves_dev_and_keeps_all_jpgs(tmp_path, data_dir):
    src = fx.build_dim_rich(tmp_path / "dim")
    fx.build_dim_wiki(src)  # a data root holding two subsets: the name picks one
    ds = datasets.load(prepare(src, "richpediamel").name)
    assert ds.meta["subset"] == "richpedia"
    counts = ds.counts()
    assert (counts["mentions_train"], counts["mentions_dev"], counts["mentions_test"]) == (9, 1, 2)
    assert ds.meta["reader"]["dev_carved_from_train"] == 1
    assert any("no dev.json" in n for n in ds.meta["notes"])
    dev_ids = ds.split("dev")["mention_id"].tolist()
    assert all(i.startswith("train-") for i in dev_ids)  # ids do not depend on the seed
    m = ds.mentions.set_index("mention_id")
    # only .jpg kept (case-insensitive, as prepare_richpedia.py), image = the first one
    assert list(m.loc["train-Q201", "images"]) == ["images/richpedia/images/Q201_1.jpg",
                                                   "images/richpedia/images/Q201_2.JPG"]
    assert m.loc["train-Q201", "image"] == "images/richpedia/images/Q201_1.jpg"
    assert ds.image_path(m.loc["train-Q201", "image"]).is_file()
    assert not _present(m.loc["train-Q200", "image"]) and list(m.loc["train-Q200", "images"]) == []
    assert ds.meta["reader"]["non_jpg_images_dropped"] == 11
    assert ds.meta["images_missing"] == 0
    # the carve is deterministic and follows the seed
    again = datasets.load(prepare(src, "rich2", subset="rich").name)
    assert again.split("dev")["mention_id"].tolist() == dev_ids
    other = [datasets.load(prepare(src, f"rich-s{s}", subset="richpedia", seed=s).name)
             .split("dev")["mention_id"].tolist() for s in (1, 2)]
    assert any(o != dev_ids for o in other)


def test_dim_root_with_several_subsets_needs_a_choice(tmp_path, data_dir, capsys):
    src = fx.build_dim_rich(tmp_path / "dim")
    fx.build_dim_wiki(src)
    with pytest.raises(DimkitError, match=r"subset=\.\.\., or name the dataset after it \(e\.g\. dataset='wikimel'\)"):
        prepare(src, "mydata")
    assert cli.main(["prepare", str(src), "--name", "mydata"]) == 2
    assert "pick one with --subset, or name the dataset after it (e.g. --name wikimel)" in capsys.readouterr().err
    with pytest.raises(DimkitError, match="unknown subset"):
        prepare(src, "mydata", subset="wikidiverse")
    assert datasets.load(prepare(src, "mydata", subset="WIKIMEL").name).meta["subset"] == "wikipedia"


def test_dim_wikidiverse(tmp_path, data_dir):
    src = fx.build_dim_diverse(tmp_path / "dim")
    ds = datasets.load(prepare(src, "diverse").name)
    assert ds.name == "wikidiverse" and ds.meta["subset"] == "wikidiverse"
    m = ds.mentions.set_index("mention_id")
    assert list(m.index) == ["train-0", "train-1", "train-2", "dev-0", "test-0", "test-1"]
    assert any("valid.json" in n for n in ds.meta["notes"])
    assert m.loc["train-0", "qid"] == "Barack Obama"  # the KB key is the title
    assert m.loc["train-0", "mention_type"] == "Person" and m.loc["dev-0", "topic"] == "politics"
    assert m.loc["train-1", "image"] == "images/wikidiverse/c3d4.png"
    assert not _present(m.loc["train-2", "image"])
    e = ds.entities.set_index("qid")
    assert set(e.index) == set(fx.DIVERSE_ENTITIES)
    assert e.loc["Chicago", "name"] == "Chicago"
    assert e.loc["Chicago", "description"] == "City in Illinois."
    c = ds.candidates.set_index("mention_id")
    # keyed by the gold entity (label leakage): both "Obama" mentions get Barack Obama's list
    assert list(c.loc["train-0", "qids"]) == ["Michelle Obama", "Chicago", "Chicago Bulls"]
    assert list(c.loc["test-0", "qids"]) == list(c.loc["train-0", "qids"])
    assert "leakage" in ds.meta["candidates"]["note"]
    assert ds.meta["candidates"]["unknown_qids_dropped"] == 1


def test_dim_wikidiverse_plus(tmp_path, data_dir):
    src = fx.build_dim_diverse(tmp_path / "dim", llm=True)
    ds = datasets.load(prepare(src, "diverse+").name)
    e = ds.entities.set_index("qid")
    assert e.loc["Chicago", "description"] == "LLM text on Chicago."
    assert e.loc["Chicago", "description_original"] == "City in Illinois."
    assert e.loc["Chicago", "description_source"] == "llm (released)"


# ---------------------------------------------------------------------------------------------
# MIMIC and MELBench


def test_mimic_richpediamel_with_the_mention_images_trap(tmp_path, data_dir):
    src = fx.build_mimic(tmp_path / "RichpediaMEL")
    ds = datasets.load(prepare(src, "mimic-rich").name)
    assert ds.meta["layout"] == "mimic" and ds.meta["subset"] == "RichpediaMEL"
    assert ds.meta["dataset"] == "richpediamel"
    assert ds.meta["reader"]["mention_image_folder"] == "mention_images"
    assert any("MIMIC issue #2" in n for n in ds.meta["notes"])
    assert ds.meta["reader"]["nil_skipped"] == 1
    m = ds.mentions.set_index("mention_id")
    assert list(m.index) == ["train-0", "train-1", "dev-0", "test-0"]  # the NIL train-2 skipped
    assert m.loc["train-1", "mention"] == "Paris Hilton"  # URL-unquoted
    assert m.loc["train-1", "image"] == "images/mention_images/m_1.jpg"  # stem + .jpg
    assert ds.image_path(m.loc["train-0", "image"]).is_file()
    assert not _present(m.loc["dev-0", "image"])
    assert ds.meta["images"]["mention_images_missing"] == 1  # m_4.jpg
    e = ds.entities
    assert list(e["qid"]) == ["Q501", "Q502", "Q503"]  # sorted by KB id, not file order
    assert e.set_index("qid").loc["Q502", "name"] == "Paris Hilton"
    assert e.set_index("qid").loc["Q503", "description"] == "city in France"
    assert list(e.set_index("qid").loc["Q503", "images"]) == ["images/kb_image/Q503_0.jpg",
                                                              "images/kb_image/Q503_1.jpg"]
    assert ds.meta["images"]["entity_images_missing"] == 0
    assert ds.candidates is None


def test_mimic_wikimel_prefix_and_mention_image_folder(tmp_path, data_dir):
    src = fx.build_mimic(tmp_path / "WikiMEL", prefix="WIKIMEL", mention_folder="mention_image")
    ds = datasets.load(prepare(src, "mimic-wiki").name)
    assert ds.meta["subset"] == "WIKIMEL" and ds.meta["dataset"] == "wikimel"
    assert ds.mentions["image"].iloc[0] == "images/mention_image/m_0.jpg"
    assert not any("issue #2" in n for n in ds.meta["notes"])


def test_melbench_wikidata_split_by_sentence_and_deterministic(tmp_path, data_dir):
    src = fx.build_melbench_wikidata(tmp_path)
    ds = datasets.load(prepare(src, "wdmel").name)
    m = ds.mentions
    assert len(m) == 25  # 20 sentences, 5 of them with two mentions
    assert m["image"].isna().all()
    assert set(m.loc[m["mention_id"].str.startswith("1000-"), "mention"]) == {"Person 0", "Person 1"}
    per_sentence = m.groupby(m["mention_id"].str.split("-").str[0])["split"].nunique()
    assert (per_sentence == 1).all()
    sentences = m.drop_duplicates("sentence")
    assert sentences["split"].value_counts().to_dict() == {"train": 14, "dev": 2, "test": 4}
    e = ds.entities
    assert len(e) == 20 and e["description"].isna().all() and (e["description_source"] == "none").all()
    assert e.set_index("qid").loc["Q7001", "name"] == "Person 1 (x)"
    assert ds.meta["seed"] == 114514 and ds.meta["images"]["root"] is None
    again = datasets.load(prepare(src, "wdmel2").name).mentions
    assert again[["mention_id", "split"]].equals(m[["mention_id", "split"]])
    other = datasets.load(prepare(src, "wdmel3", seed=7).name).mentions
    assert not other["split"].equals(m["split"])


def test_melbench_richpedia(tmp_path, data_dir):
    src = fx.build_melbench_richpedia(tmp_path)
    ds = datasets.load(prepare(src, "rpmel").name)
    assert ds.meta["subset"] == "Richpedia-MEL" and ds.meta["dataset"] == "richpediamel"
    assert ds.mentions["mention_id"].tolist()[:2] == ["Q8000-0", "Q8001-0"]
    assert ds.counts()["mentions"] == 10 and ds.counts()["entities"] == 10
    assert ds.split("train").shape[0] == 7
    # a NIL answer is skipped and counted; the other sentences keep their split
    _edit_json(src, lambda d: d["Q8004"].update(answer="nil"))
    nil = datasets.load(prepare(src, "rpmel-nil").name)
    assert nil.counts()["mentions"] == 9 and nil.meta["reader"]["nil_skipped"] == 1
    kept = ds.mentions[ds.mentions["mention_id"] != "Q8004-0"].reset_index(drop=True)
    assert nil.mentions["split"].tolist() == kept["split"].tolist()


def test_seeded_split_proportions_and_independence_from_order():
    keys = [f"k{i}" for i in range(100)]
    a = seeded_split(keys, 3)
    b = seeded_split(list(reversed(keys)), 3)
    assert a == b
    assert pd.Series(a).value_counts().to_dict() == {"train": 70, "test": 20, "dev": 10}


# ---------------------------------------------------------------------------------------------
# images placement


def test_images_inside_the_output_folder_are_referenced_in_place(tmp_path, data_dir):
    # the bundled sample's shape: data/<name>/source/ holds the release layout
    src = fx.build_dim_wiki(data_dir / "mini" / "source")
    ds = datasets.load(prepare(src, "mini").name)
    assert ds.mentions["image"].iloc[0] == "source/ImgData/wikipedia/10.jpg"
    assert not (ds.root / "images").exists()
    assert ds.image_path(ds.mentions["image"].iloc[0]).is_file()
    assert (src / "wikipedia" / "train.json").is_file()  # the source is untouched
    assert ds.meta["images"]["placement"].startswith("inside")


def test_copy_images_instead_of_linking(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim")
    root = prepare(src, "wcopy", copy_images=True)
    assert (root / "images").is_dir() and not (root / "images").is_symlink()
    assert (root / "images" / "wikipedia" / "10.jpg").is_file()
    assert sorted(p.name for p in (root / "images" / "wikipedia").iterdir())[:2] == ["10.jpg", "11.jpg"]
    # rerun with a link: the copy is replaced, no staging folders left
    prepare(src, "wcopy")
    assert (root / "images").is_symlink()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_explicit_images_root(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim")
    moved = tmp_path / "elsewhere" / "imgs"
    moved.parent.mkdir()
    os.rename(src / "ImgData", moved)
    ds = datasets.load(prepare(src, "wimg", images=moved).name)
    assert ds.image_path(ds.mentions["image"].iloc[0]).is_file()
    with pytest.raises(DataError, match="images folder not found"):
        prepare(src, "wimg2", images=tmp_path / "nowhere")
    assert not (data_dir / "wimg2").exists()


def test_sample_source_prepares_through_load(tmp_path):
    if not (paths.sample_source_dir() / "wikipedia" / "train.json").is_file():
        pytest.skip("dimkit/data/sample/source is not generated yet")
    ds = datasets.load("sample", data_dir=tmp_path)
    assert ds.counts()["mentions"] > 0 and ds.meta["layout"] == "dim"
    assert ds.image_path(ds.mentions["image"].dropna().iloc[0]) is not None


# ---------------------------------------------------------------------------------------------
# bad input: each names file, record and field; non-zero CLI exit; nothing left behind


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def _wiki(tmp_path):
    return fx.build_dim_wiki(tmp_path / "dim")


def _mimic(tmp_path):
    return fx.build_mimic(tmp_path / "mimic")


def _append_raw_entry(path: Path, key: str, value) -> None:
    text = path.read_text().rstrip()
    assert text.endswith("}")
    path.write_text(text[:-1].rstrip() + f',\n  "{key}": {json.dumps(value)}\n}}\n')


def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1
    path.write_text(text.replace(old, new))


def _del(d, *keys):
    for k in keys[:-1]:
        d = d[k]
    del d[keys[-1]]


BAD_INPUTS = {
    # name: (build, src subpath, mutate(src), file suffix, record, field, message fragment)
    "missing split file": (
        _wiki, "", lambda s: (s / "wikipedia" / "test.json").unlink(),
        "wikipedia/test.json", None, None, "file not found"),
    "missing kb file": (
        _mimic, "", lambda s: (s / "kb_entity.json").unlink(),
        "kb_entity.json", None, None, "file not found"),
    "malformed json": (
        _wiki, "", lambda s: (s / "wikipedia" / "dev.json").write_text('{\n  "20": {"sentence": "x",\n'),
        "wikipedia/dev.json", None, None, "malformed JSON at line 3, column 1"),
    "record without sentence": (
        _wiki, "", lambda s: _edit_json(s / "wikipedia" / "train.json", lambda d: _del(d, "11", "sentence")),
        "wikipedia/train.json", "11", "sentence", "required field is missing"),
    "wiki record without imgPath": (
        _wiki, "", lambda s: _edit_json(s / "wikipedia" / "test.json", lambda d: _del(d, "31", "imgPath")),
        "wikipedia/test.json", "31", "imgPath", "required field is missing"),
    "mimic record without answer": (
        _mimic, "", lambda s: _edit_json(s / "RichpediaMEL_dev.json", lambda d: _del(d, 0, "answer")),
        "RichpediaMEL_dev.json", 0, "answer", "required field is missing"),
    "diverse record without entity": (
        lambda t: fx.build_dim_diverse(t / "dim"), "",
        lambda s: _edit_json(s / "wikidiverse" / "test.json", lambda d: _del(d, 1, "entity")),
        "wikidiverse/test.json", 1, "entity", "required field is missing"),
    "melbench record without answer": (
        lambda t: fx.build_melbench_wikidata(t).parent, "Wikidata-MEL.json",
        lambda s: _edit_json(s / "Wikidata-MEL.json", lambda d: _del(d, "1003", "answer")),
        "Wikidata-MEL.json", "1003", "answer", "required field is missing"),
    "answer not in kb": (
        _wiki, "", lambda s: _edit_json(s / "wikipedia" / "train.json",
                                        lambda d: d["12"].update(answer="Q4242")),
        "wikipedia/train.json", "12", "answer", "'Q4242' is not in the knowledge base"),
    "mimic answer not in kb": (
        _mimic, "", lambda s: _edit_json(s / "RichpediaMEL_test.json",
                                         lambda d: d[0].update(answer="Q999")),
        "RichpediaMEL_test.json", 0, "answer", "'Q999' is not in the knowledge base"),
    "diverse answer not in kb": (
        lambda t: fx.build_dim_diverse(t / "dim"), "",
        lambda s: _edit_json(s / "wikidiverse" / "train.json", lambda d: d[2].update(entity="Atlantis")),
        "wikidiverse/train.json", 2, "entity", "'Atlantis' is not in the knowledge base"),
    "duplicate qid in qids_ordered": (
        _wiki, "", lambda s: _edit_json(s / "wikipedia" / "qids_ordered.json", lambda d: d.append("Q1001")),
        "qids_ordered.json", "Q1001", "qid", "duplicate qid"),
    "duplicate key in a split file": (
        _wiki, "", lambda s: _append_raw_entry(s / "wikipedia" / "train.json", "10",
                                               fx.wiki_records()["train"]["11"]),
        "wikipedia/train.json", "10", "key", "duplicate key"),
    "duplicate field in a record": (
        _wiki, "", lambda s: _replace_once(s / "wikipedia" / "train.json", '"answer": "Q1002"',
                                           '"answer": "Q1002", "answer": "Q1001"'),
        "wikipedia/train.json", "11", "answer", "duplicate field"),
    "duplicate qid in qid2id": (
        _mimic, "", lambda s: (s / "qid2id.json").write_text('{"Q501": 0, "Q502": 1, "Q501": 2}'),
        "qid2id.json", "Q501", "qid", "duplicate key"),
    "duplicate id in qid2id": (
        _mimic, "", lambda s: (s / "qid2id.json").write_text('{"Q501": 0, "Q502": 1, "Q503": 1}'),
        "qid2id.json", "Q503", "id", "duplicate id 1"),
    "duplicate entity id in kb_entity": (
        _mimic, "", lambda s: _edit_json(s / "kb_entity.json", lambda d: d[0].update(id=0)),
        "kb_entity.json", 0, "id", "duplicate entity id"),
    "duplicate melbench id": (
        lambda t: fx.build_melbench_richpedia(t).parent, "Richpedia-MEL.json",
        lambda s: _edit_json(s / "Richpedia-MEL.json", lambda d: d["Q8003"].update(id="Q8001")),
        "Richpedia-MEL.json", "Q8003", "id", "duplicate id 'Q8001'"),
    "image path escapes the root": (
        _wiki, "", lambda s: _edit_json(s / "wikipedia" / "train.json",
                                        lambda d: d["13"].update(imgPath="wikipedia/../../../etc/passwd")),
        "wikipedia/train.json", "13", "imgPath", "escapes the dataset root"),
    "absolute image path": (
        _wiki, "", lambda s: _edit_json(s / "wikipedia" / "dev.json",
                                        lambda d: d["21"].update(imgPath="/etc/passwd")),
        "wikipedia/dev.json", "21", "imgPath", "is absolute"),
    "rich img_list escapes": (
        lambda t: fx.build_dim_rich(t / "dim"), "",
        lambda s: _edit_json(s / "richpedia" / "test.json",
                             lambda d: d["Q211"].update(img_list=["../../../../secret.jpg"])),
        "richpedia/test.json", "Q211", "img_list", "escapes the dataset root"),
    "diverse mention_image escapes": (
        lambda t: fx.build_dim_diverse(t / "dim"), "",
        lambda s: _edit_json(s / "wikidiverse" / "valid.json",
                             lambda d: d[0].update(mention_image="../../x.jpg")),
        "wikidiverse/valid.json", 0, "mention_image", "escapes the dataset root"),
    "kb image path absolute": (
        _mimic, "", lambda s: _edit_json(s / "kb_entity.json",
                                         lambda d: d[1].update(image_list=["/abs/Q502.jpg"])),
        "kb_entity.json", 1, "image_list", "is absolute"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_named_and_leaves_nothing(case, tmp_path, data_dir, capsys):
    build, sub, mutate, file_suffix, record, field, fragment = BAD_INPUTS[case]
    base = build(tmp_path)
    mutate(base)
    src = base / sub if sub else base
    with pytest.raises(DataError) as err:
        prepare(src, "broken")
    exc = err.value
    assert exc.file is not None and exc.file.endswith(file_suffix), exc.file
    assert exc.record == record and exc.field == field, (exc.record, exc.field)
    assert fragment in str(exc)
    assert not (data_dir / "broken").exists()
    # the CLI: same message on stderr, exit status 2, still nothing written
    capsys.readouterr()
    rc = cli.main(["prepare", str(src), "--name", "broken"])
    assert rc == 2
    stderr = capsys.readouterr().err
    assert "dimkit prepare: error:" in stderr and Path(file_suffix).name in stderr
    if field is not None:
        assert f"field {field!r}" in stderr
    assert not (data_dir / "broken").exists()


def test_failure_keeps_the_previous_good_output(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim")
    root = prepare(src, "wikimel")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    link = os.readlink(root / "images")
    _edit_json(src / "wikipedia" / "test.json", lambda d: d["30"].update(answer="Q4242"))
    assert cli.main(["prepare", str(src), "--name", "wikimel", "--copy-images"]) == 2
    after = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    assert after == before
    assert os.readlink(root / "images") == link
    assert datasets.load("wikimel").counts()["mentions"] == 11


def test_cli_prints_a_summary(tmp_path, data_dir, capsys):
    src = fx.build_mimic(tmp_path / "mimic")
    rc = cli.main(["prepare", str(src), "--name", "mimic-rich", "--seed", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "prepared 'mimic-rich'" in out and str(data_dir / "mimic-rich") in out
    assert "mentions: 4 (train 2, dev 1, test 1); entities: 3" in out
    assert "MIMIC issue #2" in out
    assert json.loads((data_dir / "mimic-rich" / "meta.json").read_text())["seed"] == 3


def test_cli_layout_and_name_errors(tmp_path, data_dir, capsys):
    src = fx.build_dim_wiki(tmp_path / "dim")
    assert cli.main(["prepare", str(src), "--name", "x", "--layout", "melbench"]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["prepare", str(src), "--name", "Bad Name!"]) == 2
    assert cli.main(["prepare", str(tmp_path / "absent"), "--name", "x"]) == 2
    assert "source not found" in capsys.readouterr().err
    assert not (data_dir / "x").exists()


# ---------------------------------------------------------------------------------------------
# a UTF-8 byte order mark (Windows editors and PowerShell write one) is not malformed JSON

BOM_SOURCES = {
    "dim wikimel": lambda t: fx.build_dim_wiki(t / "dim"),
    "dim wikidiverse": lambda t: fx.build_dim_diverse(t / "dim"),
    "mimic": lambda t: fx.build_mimic(t / "mimic"),
    "melbench": lambda t: fx.build_melbench_wikidata(t / "mb"),
}


@pytest.mark.parametrize("case", list(BOM_SOURCES))
def test_json_with_a_utf8_bom_is_read(case, tmp_path, data_dir):
    src = BOM_SOURCES[case](tmp_path)
    plain = datasets.load(prepare(src, "plain").name)
    files = [src] if src.is_file() else sorted(src.rglob("*.json"))
    assert files
    for f in files:
        f.write_bytes(b"\xef\xbb\xbf" + f.read_bytes())
    ds = datasets.load(prepare(src, "bom").name)
    cols = ["mention_id", "split", "sentence", "mention", "image", "qid"]
    assert ds.mentions[cols].equals(plain.mentions[cols])
    assert ds.entities[["qid", "name", "description"]].equals(plain.entities[["qid", "name", "description"]])
    assert ds.meta["layout"] == plain.meta["layout"] and ds.meta["subset"] == plain.meta["subset"]


# ---------------------------------------------------------------------------------------------
# links in the raw image folder that point outside it are never copied or opened


def test_copy_images_refuses_links_out_of_the_image_folder(tmp_path, data_dir, capsys):
    src = fx.build_dim_wiki(tmp_path / "dim")
    fx.plant_outside_links(src, tmp_path / "outside")
    root = prepare(src, "wcopy", copy_images=True)
    copied = root / "images" / "wikipedia"
    assert not (copied / "evil.jpg").exists() and not (copied / "linked").exists()
    assert not any("secret" in p.read_bytes().decode("latin-1") for p in copied.rglob("*") if p.is_file())
    assert (copied / "alias.jpg").read_bytes() == (src / "ImgData" / "wikipedia" / "12.jpg").read_bytes()
    meta = json.loads((root / "meta.json").read_text())
    assert meta["images"]["mention_images_outside"] == 2
    assert meta["images"]["mention_images_missing"] == 1  # 32's image, absent from the start
    assert any("outside the images root" in n and "wikipedia/evil.jpg" in n for n in meta["notes"])
    summary = prepare_mod.format_summary(root)
    assert "refused (outside the images root): 2" in summary
    # the image check sees them as missing: nothing of the outside files is in the dataset
    from dimkit import images
    pm = images.run(images.ImagesConfig.for_dataset("wcopy", write=False), progress=False).per_mention
    status = pm.set_index("mention_id")["status"]
    assert status["train-13"] == "missing" and status["train-15"] == "missing"
    assert status["train-12"] == "ok"


def test_linked_images_root_does_not_expose_links_out_of_it(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim")
    fx.plant_outside_links(src, tmp_path / "outside")
    root = prepare(src, "wlink")
    assert (root / "images").is_symlink()
    meta = json.loads((root / "meta.json").read_text())
    assert meta["images"]["mention_images_outside"] == 2
    ds = datasets.load("wlink")
    m = ds.mentions.set_index("mention_id")
    for mid in ("train-13", "train-15"):
        with pytest.raises(DataError, match="outside the dataset's image folder"):
            ds.image_path(m.loc[mid, "image"])
    assert ds.image_path(m.loc["train-12", "image"]).is_file()


@pytest.mark.parametrize("copy_images", [False, True])
def test_a_link_loop_among_the_images_counts_as_missing(tmp_path, data_dir, copy_images):
    """`ln -s b.jpg a.jpg; ln -s a.jpg b.jpg` in the image folder, a.jpg referenced by a mention: prepared,
    reported like a missing image, no traceback; `dimkit images` reports it too."""
    src = fx.build_dim_wiki(tmp_path / "dim")
    folder = src / "ImgData" / "wikipedia"
    (folder / "a.jpg").symlink_to("b.jpg")
    (folder / "b.jpg").symlink_to("a.jpg")
    split = src / "wikipedia" / "train.json"
    records = json.loads(split.read_text())
    records["13"]["imgPath"] = "wikipedia/a.jpg"
    fx.dump(split, records)
    name = "wloopc" if copy_images else "wloop"
    root = prepare(src, name, copy_images=copy_images)
    meta = json.loads((root / "meta.json").read_text())
    assert meta["images"]["mention_images_missing"] == 2  # a.jpg and 32's image, absent from the start
    assert meta["images"]["mention_images_outside"] == 0
    assert any("link loop" in n and "wikipedia/a.jpg" in n for n in meta["notes"])
    assert "referenced files missing: 2" in prepare_mod.format_summary(root)
    if copy_images:
        assert not (root / "images" / "wikipedia" / "a.jpg").exists()
    from dimkit import images
    pm = images.run(images.ImagesConfig.for_dataset(name, write=False), progress=False).per_mention
    assert pm.set_index("mention_id")["status"]["train-13"] != "ok"


def test_a_rerun_on_an_unchanged_source_prepares_nothing_again(tmp_path, data_dir, capsys):
    src = fx.build_dim_wiki(tmp_path / "src")
    root = prepare(src, "wikimel")
    stamp = (root / "mentions.parquet").stat().st_mtime_ns
    from dimkit import candidates

    candidates.run(candidates.CandidatesConfig.for_dataset("wikimel", k=5, replace_released=True), progress=False)
    assert cli.main(["prepare", str(src), "--name", "wikimel"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert (root / "mentions.parquet").stat().st_mtime_ns == stamp  # not rewritten
    assert datasets.load("wikimel").meta["candidates"]["source"] == candidates.BUILT_SOURCE  # later stages kept
    train = src / "wikipedia" / "train.json"
    data = json.loads(train.read_text())
    first = next(iter(data))
    data[first]["sentence"] = "An edited sentence about " + data[first]["mentions"] + "."
    train.write_text(json.dumps(data))
    prepare(src, "wikimel")  # a changed source file is read again
    assert (root / "mentions.parquet").stat().st_mtime_ns != stamp
    assert datasets.load("wikimel").mentions["sentence"].str.startswith("An edited").sum() == 1
    stamp = (root / "mentions.parquet").stat().st_mtime_ns
    prepare(src, "wikimel", force=True)  # and --force prepares it again regardless
    assert (root / "mentions.parquet").stat().st_mtime_ns != stamp


# ---------------------------------------------------------------------------------------------
# a dataset name already taken by another source or another stage is not replaced silently


def test_another_source_does_not_replace_a_prepared_dataset(tmp_path, data_dir, capsys):
    first = fx.build_dim_wiki(tmp_path / "first")
    root = prepare(first, "wikimel")
    before = {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()}
    other = fx.build_dim_wiki(tmp_path / "other")
    with pytest.raises(DimkitError, match=r"prepared from .*first.*force=True") as err:
        prepare(other, "wikimel")
    assert "11 mentions" in str(err.value) and str(other) in str(err.value)
    # another subset of the same data root is another dataset too
    fx.build_dim_rich(first)
    with pytest.raises(DimkitError, match="would replace it"):
        prepare(first, "wikimel", subset="richpedia")
    assert {p.name: p.read_bytes() for p in root.iterdir() if p.is_file()} == before
    capsys.readouterr()
    assert cli.main(["prepare", str(other), "--name", "wikimel"]) == 2
    assert "--force" in capsys.readouterr().err
    # the same source with other settings is prepared again, as before
    prepare(first, "wikimel", subset="wikipedia", seed=7)
    assert datasets.load("wikimel").meta["seed"] == 7
    # and --force replaces it
    prepare(other, "wikimel", force=True)
    assert datasets.load("wikimel").meta["source_resolved"] == str(other.resolve())
    # a folder that another tool wrote is not replaced either
    fx.dump(data_dir / "mine" / "meta.json", {"name": "mine"})
    with pytest.raises(DimkitError, match="does not say `dimkit prepare` wrote"):
        prepare(other, "mine")
    assert json.loads((data_dir / "mine" / "meta.json").read_text()) == {"name": "mine"}


def test_a_release_that_moved_is_prepared_again_from_its_new_place(tmp_path, data_dir):
    first = fx.build_dim_wiki(tmp_path / "first")
    prepare(first, "wikimel")
    moved = first.rename(tmp_path / "moved")
    prepare(moved, "wikimel")  # no --force: the old place no longer exists, the runs keep their name
    assert datasets.load("wikimel").meta["source_resolved"] == str(moved.resolve())


def test_prepare_does_not_replace_an_augmented_dataset(kit_dirs, capsys):
    src = paths.sample_source_dir()
    if not (src / "wikipedia" / "train.json").is_file():
        pytest.skip("dimkit/data/sample/source is not generated yet")
    plus = datasets.load("sample+")  # prepares the sample, then augments it with the stored answers
    assert plus.meta["augmented_from"] == "sample"
    before = (plus.root / "entities.parquet").read_bytes()
    capsys.readouterr()
    assert cli.main(["prepare", str(src), "--name", "sample+"]) == 2
    err = capsys.readouterr().err
    assert "dimkit augment" in err and "LLM descriptions would be lost" in err and "--force" in err
    assert (plus.root / "entities.parquet").read_bytes() == before
    assert datasets.load("sample+").meta["augmented_from"] == "sample"
    # the sample itself, from the same source and settings, stays a no-op
    assert prepare_mod.run(prepare_mod.PrepareConfig(src=src, dataset="sample")).up_to_date
    prepare(src, "sample+", force=True)
    assert "augmented_from" not in datasets.load("sample+").meta


# ---------------------------------------------------------------------------------------------
# a source without a single mention is an error, not an empty dataset


def test_melbench_without_records_is_an_error(tmp_path, data_dir, capsys):
    empty = fx.dump(tmp_path / "Wikidata-MEL.json", {})
    with pytest.raises(DataError, match="no records found for the Wikidata-MEL subset") as err:
        prepare(empty, "mb")
    assert err.value.file == str(empty)
    other = fx.dump(tmp_path / "mine.json", {})
    with pytest.raises(DataError, match="no records found for the Richpedia-MEL subset"):
        prepare(other, "mb", subset="richpedia")
    nil = fx.dump(tmp_path / "Richpedia-MEL.json", {"Q1": {"sentence": "x", "mentions": "x", "entities": "X",
                                                         "answer": "nil"}})
    capsys.readouterr()
    assert cli.main(["prepare", str(nil), "--name", "mb"]) == 2
    assert "Richpedia-MEL.json" in capsys.readouterr().err
    assert not (data_dir / "mb").exists()


def test_dim_split_files_without_records_are_an_error(tmp_path, data_dir):
    src = fx.build_dim_wiki(tmp_path / "dim", records={"train": {}, "dev": {}, "test": {}})
    with pytest.raises(DataError, match="no mentions found"):
        prepare(src, "wikimel")
    assert not (data_dir / "wikimel").exists()


# ---------------------------------------------------------------------------------------------
# DIM release: a record key is the sample's id, so one in two split files is a mention in two splits


@pytest.mark.parametrize("build, other", [(_wiki, "dev.json"), (lambda t: fx.build_dim_rich(t / "dim"), None)])
def test_dim_record_in_two_split_files_is_an_error(build, other, tmp_path, data_dir):
    src = build(tmp_path)
    folder = next(d for d in (src / "wikipedia", src / "richpedia") if d.is_dir())
    train = json.loads((folder / "train.json").read_text())
    key, rec = next(iter(train.items()))
    target = folder / (other or "test.json")
    _edit_json(target, lambda d: d.update({key: rec}))
    with pytest.raises(DataError, match="same record key") as err:
        prepare(src, "leaky")
    exc = err.value
    assert exc.file == str(target) and exc.record == key and exc.field == "key"
    assert str(folder / "train.json") in str(exc)
    assert not (data_dir / "leaky").exists()
