"""The durable store behind every expensive step."""
from __future__ import annotations

import multiprocessing as mp
import sqlite3

from dimkit.store import Store, make_key


def test_keys_depend_on_model_version_and_content():
    k = make_key("llm", "gpt-x", "who-is@1", {"qid": "Q1"})
    assert k == make_key("llm", "gpt-x", "who-is@1", {"qid": "Q1"})
    assert len({k, make_key("llm", "gpt-y", "who-is@1", {"qid": "Q1"}),
                make_key("llm", "gpt-x", "who-is@2", {"qid": "Q1"}),
                make_key("llm", "gpt-x", "who-is@1", {"qid": "Q2"})}) == 4


def test_put_get_and_failures(tmp_path):
    s = Store(tmp_path / "s.sqlite")
    s.put_failure("k1", kind="llm", model="m", version="v", item="Q1", reason="timeout")
    s.put_failure("k1", kind="llm", model="m", version="v", item="Q1", reason="rate_limited")
    assert s.get("k1") is None and "k1" not in s
    [f] = s.failures("llm")
    assert f["reason"] == "rate_limited" and f["attempts"] == 2
    s.put("k1", {"text": "ok"}, kind="llm", model="m", version="v", item="Q1")
    assert s.get("k1") == {"text": "ok"} and s.failures() == []
    assert s.get_many(["k1", "nope"]) == {"k1": {"text": "ok"}}
    assert s.count("llm") == 1 and s.count() == 1


def test_export_import_roundtrip(tmp_path):
    a = Store(tmp_path / "a.sqlite")
    a.put_many([(f"k{i}", {"i": i}, f"Q{i}") for i in range(5)], kind="cue", model="m", version="1")
    n = a.export_jsonl(tmp_path / "a.jsonl")
    b = Store(tmp_path / "b.sqlite")
    assert b.import_jsonl(tmp_path / "a.jsonl") == n == 5
    assert b.get("k3") == {"i": 3}


def _writer(path, start):
    s = Store(path)
    for i in range(start, start + 50):
        s.put(f"k{i}", i, kind="x", model="m", version="1", item=str(i))


def test_several_processes_write_one_store(tmp_path):
    path = tmp_path / "shared.sqlite"
    Store(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, s)) for s in (0, 50)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert Store(path).count("x") == 100
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_a_damaged_store_is_named_with_what_to_do(tmp_path, kit_dirs, capsys):
    import pytest

    from dimkit import cli
    from dimkit.store import StoreDamaged

    bad = tmp_path / "llm.sqlite"
    bad.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(StoreDamaged, match=r"the store is damaged \(file is not a database\).*mv .*llm.sqlite") as e:
        Store(bad)
    assert e.value.file == str(bad)

    good = tmp_path / "cues.sqlite"
    s = Store(good)
    s.put_many([(f"k{i}", {"cue": "x" * 500}, f"i{i}") for i in range(400)], kind="c", model="m", version="v")
    s.close()
    data = bytearray(good.read_bytes())
    data[4096:len(data) // 2] = b"\xff" * (len(data) // 2 - 4096)  # overwrite pages in the middle
    good.write_bytes(bytes(data))
    for wal in (tmp_path / "cues.sqlite-wal", tmp_path / "cues.sqlite-shm"):
        wal.unlink(missing_ok=True)
    with pytest.raises(StoreDamaged, match="damaged"):
        s2 = Store(good)
        s2.get_many([f"k{i}" for i in range(400)])

    # the CLI says it without a traceback: a damaged cue store under a dataset's cue run
    (kit_dirs["cache"] / "cues.sqlite").write_bytes(b"garbage" * 200)
    assert cli.main(["cues", "sample", "--expert", "sample-oracle"]) == 2
    err = capsys.readouterr().err
    assert "cues.sqlite" in err and "damaged" in err and "Traceback" not in err


def test_a_store_on_a_network_file_system_is_warned_about(tmp_path, monkeypatch, capsys):
    from dimkit import store as store_mod

    real = store_mod.filesystem_type(tmp_path)
    assert real is None or real not in store_mod.NETWORK_FILESYSTEMS  # the lookup finds this machine's disk
    monkeypatch.setattr(store_mod, "filesystem_type", lambda p: "nfs4")
    Store(tmp_path / "x.sqlite")
    err = capsys.readouterr().err
    assert "network file system (nfs4)" in err and "local disk" in err


def test_a_store_that_cannot_be_opened_where_it_is_is_named_not_a_traceback(tmp_path, kit_dirs, capsys):
    """A read-only folder, a full disk or, as here, a folder where the store file should be: the
    message names the store and what to do (root ignores permissions, so a folder stands in)."""
    import pytest

    from dimkit import cli
    from dimkit.store import StoreUnwritable

    (tmp_path / "x.sqlite").mkdir()
    with pytest.raises(StoreUnwritable, match=r"x\.sqlite: the store cannot be used here \(unable to open"):
        Store(tmp_path / "x.sqlite")
    (kit_dirs["cache"] / "cues.sqlite").mkdir()
    assert cli.main(["cues", "sample", "--expert", "sample-oracle"]) == 2
    err = capsys.readouterr().err
    assert "cues.sqlite" in err and "DIMKIT_CACHE" in err and "Traceback" not in err


def test_an_output_place_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path, kit_dirs, capsys):
    from dimkit import cli

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert cli.main(["figure2", "--datasets", "sample+", "--save", "--folder", str(blocker / "figs")]) == 2
    err = capsys.readouterr().err
    assert "dimkit figure2: error:" in err and "a-file" in err and "Traceback" not in err
