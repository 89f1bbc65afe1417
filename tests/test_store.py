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
