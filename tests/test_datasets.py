"""The prepared form: names, validation, atomic writes."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from dimkit import atomic, datasets
from dimkit.errors import DataError, DimkitError


def _tables():
    mentions = pd.DataFrame({
        "mention_id": ["m1", "m2", "m3"],
        "split": ["train", "dev", "test"],
        "sentence": ["Jordan scored.", "Jordan flows.", "Who is Jordan?"],
        "mention": ["Jordan", "Jordan", "Jordan"],
        "image": ["img/1.png", None, "img/3.png"],
        "qid": ["Q1", "Q2", None],
    })
    entities = pd.DataFrame({
        "qid": ["Q1", "Q2"],
        "name": ["Jordan", "Jordan"],
        "description": ["a player", None],
        "description_source": ["wikipedia", "none"],
        "images": [["kb/1.png"], []],
    })
    return mentions, entities


@pytest.mark.parametrize("alias,canonical", [
    ("rich+", "richpediamel+"), ("wiki+", "wikimel+"), ("diverse+", "wikidiverse+"),
    ("Sample", "sample"), ("sample+", "sample+"), ("wikimel", "wikimel"),
])
def test_canonical_names(alias, canonical):
    assert datasets.canonical_name(alias) == canonical


def test_bad_name_is_refused():
    with pytest.raises(DimkitError, match="invalid dataset name"):
        datasets.canonical_name("../etc")
    assert datasets.base_name("rich+") == "richpediamel"
    assert datasets.is_augmented("diverse+") and not datasets.is_augmented("wikidiverse")


def test_write_and_load_roundtrip(kit_dirs):
    mentions, entities = _tables()
    cands = pd.DataFrame({"mention_id": ["m1"], "qids": [["Q1", "Q2"]]})
    root = datasets.write_prepared(datasets.dataset_dir("toy"), mentions, entities,
                                   {"layout": "test"}, cands)
    assert sorted(p.name for p in root.iterdir()) == [
        "candidates.parquet", "entities.parquet", "mentions.parquet", "meta.json"]
    ds = datasets.load("toy")
    assert ds.counts() == {"mentions_train": 1, "mentions_dev": 1, "mentions_test": 1,
                           "mentions": 3, "entities": 2, "mentions_with_image": 2, "nil_mentions": 1}
    assert list(ds.candidates["qids"][0]) == ["Q1", "Q2"]
    assert ds.split("dev")["mention_id"].tolist() == ["m2"]
    assert ds.image_path(None) is None and ds.image_path("img/1.png") == root / "img/1.png"
    assert json.loads((root / "meta.json").read_text())["counts"]["entities"] == 2
    # plain pandas reads the prepared form
    assert pd.read_parquet(root / "entities.parquet")["images"].map(len).tolist() == [1, 0]


def test_unknown_dataset_says_how_to_prepare(kit_dirs):
    with pytest.raises(DimkitError, match="dimkit prepare"):
        datasets.load("wikimel")
    with pytest.raises(DimkitError, match="dimkit augment"):
        datasets.load("rich+")


@pytest.mark.parametrize("mutate,field,record", [
    (lambda m, e: m.__setitem__("qid", ["Q1", "Q9", None]), "qid", "m2"),
    (lambda m, e: m.__setitem__("mention_id", ["m1", "m1", "m3"]), "mention_id", "m1"),
    (lambda m, e: e.__setitem__("qid", ["Q1", "Q1"]), "qid", "Q1"),
    (lambda m, e: m.__setitem__("image", ["../../etc/passwd", None, None]), "image", "m1"),
    (lambda m, e: m.__setitem__("image", ["/abs/x.png", None, None]), "image", "m1"),
    (lambda m, e: m.__setitem__("split", ["train", "valid", "test"]), "split", "m2"),
])
def test_validation_names_record_and_field(kit_dirs, mutate, field, record):
    mentions, entities = _tables()
    mutate(mentions, entities)
    target = datasets.dataset_dir("bad")
    with pytest.raises(DataError) as err:
        datasets.write_prepared(target, mentions, entities, {})
    assert err.value.field == field and err.value.record == record
    assert field in str(err.value) and str(record) in str(err.value)
    assert not target.exists(), "nothing half-written is left behind"


def test_failed_rewrite_keeps_previous_good_output(kit_dirs):
    mentions, entities = _tables()
    root = datasets.write_prepared(datasets.dataset_dir("toy"), mentions, entities, {"v": 1})
    bad = mentions.copy()
    bad["qid"] = ["Q1", "Q404", None]
    with pytest.raises(DataError):
        datasets.write_prepared(root, bad, entities, {"v": 2})
    assert json.loads((root / "meta.json").read_text())["v"] == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".")]
    assert datasets.load("toy").mentions["qid"].tolist()[:2] == ["Q1", "Q2"]


def test_paths_follow_environment(kit_dirs):
    from dimkit import paths
    assert paths.data_dir() == kit_dirs["data"]
    assert paths.cache_dir() == kit_dirs["cache"]
    assert paths.runs_dir() == kit_dirs["runs"]


@pytest.mark.parametrize("table,column", [
    ("mentions", "split"), ("mentions", "qid"), ("mentions", "image"), ("mentions", "sentence"),
    ("entities", "description"), ("entities", "qid"),
])
def test_a_prepared_file_missing_a_column_is_named_on_load(kit_dirs, table, column):
    mentions, entities = _tables()
    root = datasets.write_prepared(datasets.dataset_dir("toy"), mentions, entities, {"layout": "test"})
    path = root / f"{table}.parquet"
    pd.read_parquet(path).drop(columns=[column]).to_parquet(path)
    with pytest.raises(DataError, match="missing column") as err:
        datasets.load("toy")
    assert err.value.file == str(path) and err.value.field == column


def test_a_prepared_column_of_the_wrong_type_or_a_damaged_file_is_named(kit_dirs):
    mentions, entities = _tables()
    root = datasets.write_prepared(datasets.dataset_dir("toy"), mentions, entities, {"layout": "test"})
    m = pd.read_parquet(root / "mentions.parquet")
    m["qid"] = [1.0, 2.0, None]
    m.to_parquet(root / "mentions.parquet")
    with pytest.raises(DataError, match="expected text") as err:
        datasets.load("toy")
    assert err.value.field == "qid"
    (root / "mentions.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable parquet file"):
        datasets.load("toy")
    (root / "meta.json").write_text("{ truncated")
    with pytest.raises(DataError, match="meta.json is damaged"):
        datasets.load("toy")


def test_a_prepared_split_value_outside_the_three_is_named(kit_dirs):
    mentions, entities = _tables()
    root = datasets.write_prepared(datasets.dataset_dir("toy"), mentions, entities, {"layout": "test"})
    m = pd.read_parquet(root / "mentions.parquet")
    m.loc[1, "split"] = "valid"
    m.to_parquet(root / "mentions.parquet")
    with pytest.raises(DataError, match="split 'valid'") as err:
        datasets.load("toy")
    assert err.value.record == "m2"


def test_cli_commands_name_the_missing_column_without_a_traceback(kit_dirs, capsys):
    from dimkit.cli import main

    mentions, entities = _tables()
    root = datasets.write_prepared(datasets.dataset_dir("toy"), mentions, entities, {"layout": "test"})
    pd.read_parquet(root / "mentions.parquet").drop(columns=["split"]).to_parquet(root / "mentions.parquet")
    for argv in (["info", "toy"], ["candidates", "toy"], ["images", "toy"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "missing column" in err and "'split'" in err and "Traceback" not in err



def test_atomically_written_files_get_the_mode_a_plain_open_gives(kit_dirs, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        atomic._FILE_MODE = None  # read the umask afresh
        atomic.write_text("x", tmp_path / "a.txt")
        atomic.write_parquet(pd.DataFrame({"a": [1]}), tmp_path / "a.parquet")
        mentions, entities = _tables()
        root = datasets.write_prepared(datasets.dataset_dir("toy"), mentions, entities, {"layout": "test"})
        (tmp_path / "plain.txt").write_text("x")
        plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
        assert plain == 0o644
        for p in [tmp_path / "a.txt", tmp_path / "a.parquet", *root.iterdir()]:
            assert stat.S_IMODE(p.stat().st_mode) == plain, p
    finally:
        os.umask(old)
        atomic._FILE_MODE = None


def test_the_bundled_sample_repairs_itself_when_the_checkout_moved(kit_dirs, tmp_path):
    """(A user's dataset whose release moved still loads; `dimkit images` names the cause: see
    test_images.py.) The sample links into the package; a moved checkout left the link pointing at nothing."""
    import os

    sample = datasets.load("sample+")
    link = datasets.dataset_dir("sample") / "images"
    link.unlink()
    os.symlink(tmp_path / "old-checkout" / "images", link)
    assert not (sample.root / "images").exists()
    again = datasets.load("sample+")
    assert (again.root / "images").is_dir() and again.image_path(again.mentions["image"].dropna().iloc[0]).is_file()


def test_atomic_writes_go_through_symlinks_and_never_replace_special_files(tmp_path):
    import os

    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    atomic.write_text("new", link)
    assert link.is_symlink() and real.read_text() == "new"  # the link stays, its file is replaced
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target in (fifo, tmp_path):
        with pytest.raises(DimkitError, match="is not a regular file"):
            atomic.write_text("x", target)
    assert fifo.exists() and not fifo.is_file()  # still a pipe
