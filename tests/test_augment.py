"""dimkit.augment and dimkit.llm against a real OpenAI-compatible HTTP server on 127.0.0.1.

No mock of the client: every request goes through the official ``openai`` client over TCP to
``tests/llm_server.py``, which injects latency, 429 + Retry-After, 500, hangs past the timeout,
malformed JSON, empty content and dropped connections.
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dimkit import augment as aug
from dimkit import cli, datasets, paths
from dimkit.errors import ConfigError, DimkitError
from dimkit.llm import ChatClient, Endpoint, LLMError, Pacer, estimate_cost, parse_completion, parse_retry_after
from dimkit.store import Store, default_store_path

sys.path.insert(0, str(Path(__file__).parent))
from llm_server import FakeLLMServer, fake_answer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-dimkit-SECRET-7f3a9c1e5b"  # distinctive, so a leak is found by grep
WORDS = ("Alpha Bravo Charlie Delta Echo Foxtrot Golf Hotel India Juliett Kilo Lima Mike November "
         "Oscar Papa Quebec Romeo Sierra Tango Uniform Victor Whiskey Xray Yankee Zulu").split()
FAST = dict(timeout_s=2.0)


def make_toy(name: str = "toy", n: int = 12) -> Path:
    """A prepared dataset of ``n`` entities named 'Person <Word>', with real image files and candidates."""
    root = paths.data_dir() / name
    (root / "images").mkdir(parents=True, exist_ok=True)
    ents, ments = [], []
    for i in range(n):
        word = WORDS[i] if i < len(WORDS) else f"W{i:04d}x"
        qid = f"Q{100 + i}"
        (root / "images" / f"e{i}.png").write_bytes(b"\x89PNG not really")
        ents.append({"qid": qid, "name": f"Person {word}", "description": f"original description {i}",
                     "description_source": "brief", "images": [f"images/e{i}.png"]})
        ments.append({"mention_id": f"m{i}", "split": ("train", "dev", "test")[i % 3],
                      "sentence": f"A sentence about {word}.", "mention": word,
                      "image": f"images/e{i}.png" if i % 2 == 0 else None, "qid": qid})
    cands = pd.DataFrame({"mention_id": [m["mention_id"] for m in ments],
                          "qids": [[m["qid"], "Q100"] for m in ments]})
    datasets.write_prepared(root, pd.DataFrame(ments), pd.DataFrame(ents), {"layout": "test"}, cands)
    return root


def prompt_of(name: str, qid: str) -> str:
    return aug.get_template("who-is").render(qid, name)[-1]["content"]


@pytest.fixture
def server(kit_dirs, monkeypatch):
    """A fake endpoint, with OPENAI_BASE_URL / OPENAI_API_KEY pointing at it."""
    with FakeLLMServer(latency=0.005, api_key=KEY, hang_s=1.0) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        yield srv


def llm_store() -> Store:
    return Store(default_store_path("llm"))


# ------------------------------------------------------------------------------------------------
# Templates, parsing, config
# ------------------------------------------------------------------------------------------------
def test_templates_are_named_versioned_and_extensible():
    t = aug.get_template("who-is")
    assert t.id == "who-is@1" and aug.get_template("who-is@1") is t
    user = t.render("Q42", "Douglas Adams")[-1]["content"]
    assert user.startswith("Who is Douglas Adams (Wikidata Q42)?")
    # WikiDiverse keys are Wikipedia titles, not QIDs: no hint then.
    assert t.render("Douglas_Adams", "Douglas Adams")[-1]["content"].startswith("Who is Douglas Adams?")
    kb = aug.get_template("who-is-kb").render("Q1", "X", "a town")[-1]["content"]
    assert '"a town"' in kb
    mine = aug.register_template(aug.Template(name="test-brief", version=1, user="Describe {name}."))
    assert aug.get_template("test-brief") is mine and "test-brief@1" in aug.list_templates()
    with pytest.raises(ConfigError, match="already registered"):
        aug.register_template(aug.Template(name="test-brief", version=1, user="Other {name}."))
    with pytest.raises(ConfigError, match="unknown placeholder"):
        aug.register_template(aug.Template(name="test-bad", version=1, user="Who is {entity}?"))
    with pytest.raises(ConfigError, match="unknown template"):
        aug.get_template("nope")
    with pytest.raises(ConfigError, match="unknown template version"):
        aug.get_template("who-is@99")


def test_parse_completion_and_retry_after():
    ok = {"choices": [{"message": {"content": " An answer. "}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 5, "completion_tokens": 3}, "model": "m"}
    c = parse_completion(json.dumps(ok))
    assert (c.text, c.prompt_tokens, c.completion_tokens) == ("An answer.", 5, 3)
    # a real key echoed in an answer is masked; a local server's dummy key leaves ordinary words alone
    echo = {"choices": [{"message": {"content": f"Alexander, a contestant [{KEY}]"}}]}
    assert parse_completion(json.dumps(echo), KEY).text == "Alexander, a contestant [***]"
    for dummy in ("x", "test"):
        assert parse_completion(json.dumps(echo), dummy).text == f"Alexander, a contestant [{KEY}]"
    for body, reason in (("{not json", "malformed"), ("[]", "malformed"), ('{"choices": []}', "malformed"),
                         ('{"choices": [{"message": {"content": 3}}]}', "malformed"),
                         ('{"choices": [{"message": {"content": "  "}}]}', "empty"),
                         ('{"choices": [{"message": {"content": null}}]}', "empty")):
        with pytest.raises(LLMError) as ei:
            parse_completion(body)
        assert ei.value.reason == reason, body
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < parse_retry_after({"retry-after": future}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None


def test_config_is_validated(kit_dirs):
    make_toy()
    with pytest.raises(ConfigError, match="unknown augment setting 'concurency'; known: .*concurrency"):
        aug.augment("toy", concurency=3)
    with pytest.raises(ConfigError, match="concurrency"):
        aug.augment("toy", concurrency=0)
    with pytest.raises(ConfigError, match="unknown template"):
        aug.augment("toy", template="nope")
    with pytest.raises(ConfigError, match="max_attempts must be a positive whole number, got 0"):
        aug.augment("toy", max_attempts=0)
    cfg = aug.AugmentConfig.for_dataset("toy", template="who-is", out="mine")
    assert (cfg.template, cfg.out, cfg.mode) == ("who-is@1", "mine", "live")
    assert cfg.replace(dry_run=True, replay=True).mode == "dry_run"
    with pytest.raises(ConfigError, match="must differ from the source"):
        cfg.replace(out="toy")
    assert "api_key" not in cfg.to_dict() and "base_url" not in cfg.to_dict()  # never printed or saved


def test_cost_estimate_uses_known_prices():
    assert estimate_cost("gpt-4o-mini-2024-07-18", 1e6, 1e6) == pytest.approx(0.75)
    assert estimate_cost("gpt-4o-mini", 1e6, 0, batch=True) == pytest.approx(0.075)
    assert estimate_cost("my-local-llama", 1e6, 1e6) is None
    assert estimate_cost("my-local-llama", 1e6, 1e6, prices={"my-local-llama": (0, 0)}) == 0


# ------------------------------------------------------------------------------------------------
# The main path
# ------------------------------------------------------------------------------------------------
def test_augment_writes_plus_dataset_and_rerun_sends_nothing(server):
    make_toy(n=12)
    rep = aug.augment("toy", model="fake-model", concurrency=4, progress=False, **FAST)
    assert (rep.entities, rep.done, rep.failed, rep.cached, rep.requests) == (12, 12, 0, 0, 12)
    assert rep.written and rep.mode == "live" and rep.prompt_tokens > 0 and rep.completion_tokens > 0
    assert server.stats()["requests"] == 12

    src, plus = datasets.load("toy"), datasets.load("toy+")
    ents = plus.entities.set_index("qid")
    for _, e in src.entities.iterrows():
        row = ents.loc[e["qid"]]
        assert row["description"] == fake_answer(prompt_of(e["name"], e["qid"]))
        assert row["description_original"] == e["description"]
        assert row["description_source"] == "llm:fake-model:who-is@1"
    pd.testing.assert_frame_equal(plus.mentions, src.mentions)
    pd.testing.assert_frame_equal(plus.candidates, src.candidates)
    # Image paths are unchanged and resolve through the link to the source's image folder.
    rel = plus.mentions["image"].dropna().iloc[0]
    assert plus.image_path(rel).is_file() and (plus.root / "images").is_symlink()
    assert plus.image_path(plus.entities["images"].iloc[3][0]).read_bytes() == b"\x89PNG not really"
    assert plus.meta["augmented_from"] == "toy" and plus.meta["augment"]["model"] == "fake-model"
    assert plus.meta["augment"]["template"] == "who-is@1" and plus.meta["synthetic_answers"] is False
    assert plus.meta["counts"]["entities"] == 12
    saved = json.loads((paths.runs_dir() / "augment" / "toy+.json").read_text())
    assert saved["done"] == 12

    server.reset()
    again = aug.augment("toy", model="fake-model", concurrency=4, progress=False)
    assert server.stats()["requests"] == 0
    assert (again.cached, again.done, again.requests, again.written) == (12, 0, 0, True)
    assert datasets.load("toy+").entities["qid"].is_unique

    # Another template version is another key: everything is asked again.
    aug.augment("toy", out="toy-kb+", model="fake-model", template="who-is-kb", progress=False)
    assert server.stats()["requests"] == 12


def test_key_never_leaks(server, capsys, caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    make_toy(n=6)
    server.set_faults({"Bravo": ["500", "500", "500", "500"], "Charlie": ["malformed"] * 3})
    # an answer that echoes the key (a misconfigured proxy, a model shown it): masked before it is stored
    server.answer_fn = lambda prompt: fake_answer(prompt) + (f" [{KEY}]" if "Alpha" in prompt else "")
    rep = aug.augment("toy", model="fake-model", concurrency=2, max_retries=1, allow_partial=True, **FAST)
    print(rep, repr(rep), rep.to_dict())
    print(ChatClient(Endpoint.resolve()), Endpoint.resolve())
    out = capsys.readouterr()
    haystack = out.out + out.err + caplog.text
    for p in list(paths.cache_dir().rglob("*")) + list(paths.data_dir().rglob("*")) + list(
            paths.runs_dir().rglob("*")):
        if p.is_file():
            haystack += p.read_bytes().decode("latin-1")
    assert rep.failed == 2 and "server_error" in haystack  # failures were recorded ...
    assert KEY not in haystack                             # ... but never with the key
    assert "[***]" in haystack                             # the echoed key was masked, the answer kept
    assert "<set>" in repr(Endpoint.resolve())
    assert "Request options" in caplog.text or "HTTP Request" in caplog.text  # the client did log


def test_429_retry_after_is_honoured(server):
    make_toy(n=4)
    server.send_retry_after_ms = False  # a plain server: whole seconds only
    server.set_faults({"Bravo": ["429:1"]})
    rep = aug.augment("toy", model="fake-model", concurrency=4, progress=False, **FAST)
    assert rep.done == 4 and rep.failed == 0 and rep.rate_limited == 1
    times = [r["t"] for r in server.records if "Bravo" in r["prompt"]]
    assert len(times) == 2 and times[1] - times[0] >= 1.0


def test_rate_limited_server_every_entity_done(server):
    make_toy(n=40)
    server.rate_limit = 20  # admitted per sliding second; 429 + Retry-After beyond that
    rep = aug.augment("toy", model="fake-model", concurrency=8, progress=False, **FAST)
    assert rep.done == 40 and rep.failed == 0 and rep.written
    assert rep.rate_limited > 0 and server.stats()["by_status"]["429"] == rep.rate_limited
    assert rep.rate_limited < rep.done  # the learnt cap keeps workers from bouncing off the limit


def test_adaptive_pacer_learns_the_limit_from_429s():
    pacer = Pacer(None, adaptive=True)
    assert pacer.rate is None
    pacer.rate_limited(0.5)
    assert pacer.rate is None  # no success seen yet: nothing to learn from
    for i in range(30):
        pacer.success(1.0 + i / 30)
    pacer.rate_limited(2.0)
    assert pacer.rate == 30  # successes of the last second
    pacer.rate_limited(2.5)
    assert pacer.rate == 30  # at most one decrease a second
    pacer.success(2.9)
    assert pacer.rate == pytest.approx(30 + 7.5 / 30)  # +25%/s spread over the successes until the 2nd 429
    pacer.rate_limited(3.2)
    assert pacer.rate == pytest.approx(1.0)  # one success in the last second: back off hard
    pacer.success(3.3)
    assert pacer.rate == pytest.approx(2.0)  # then +5%/s, at least 1 request/s
    fixed = Pacer(15, adaptive=False)
    fixed.rate_limited(5.0)
    assert fixed.rate == 15


def test_client_side_cap_avoids_429s(server):
    make_toy(n=20)
    server.rate_limit = 20
    t = time.perf_counter()
    rep = aug.augment("toy", model="fake-model", concurrency=8, requests_per_s=15, progress=False, **FAST)
    assert rep.done == 20 and rep.rate_limited == 0 and "429" not in server.stats()["by_status"]
    assert time.perf_counter() - t >= 19 / 15 - 0.05  # request starts were spaced 1/15 s apart


def test_server_errors_and_timeouts_retried_then_failed_and_run_goes_on(server):
    make_toy(n=10)
    server.set_faults({"Alpha": ["500", "503"],          # recovers on the 3rd attempt
                       "Bravo": ["500"] * 10,            # never recovers
                       "Charlie": ["timeout"],           # recovers on the 2nd attempt
                       "Delta": ["timeout"] * 10,        # never recovers
                       "Echo": ["close"]})               # dropped connection, then fine
    rep = aug.augment("toy", model="fake-model", concurrency=4, progress=False, max_retries=2,
                      **{**FAST, "timeout_s": 0.4})
    assert rep.done == 8 and rep.failed == 2
    assert rep.failed_by_reason == {"server_error": 1, "timeout": 1}
    assert {e["name"] for e in rep.failed_examples} == {"Person Bravo", "Person Delta"}
    assert rep.errors_by_reason["connection"] == 1 and rep.retries >= 6
    prompts = server.chat_prompts()
    assert sum("Alpha" in p for p in prompts) == 3 and sum("Bravo" in p for p in prompts) == 3
    assert not rep.written and not (paths.data_dir() / "toy+" / "meta.json").exists()
    failures = {f["item"]: f["reason"] for f in llm_store().failures("llm_description")}
    assert failures == {"Q101": "server_error", "Q103": "timeout"}

    server.set_faults(None)
    server.reset()
    rep2 = aug.augment("toy", model="fake-model", concurrency=4, progress=False, **FAST)
    assert rep2.cached == 8 and rep2.done == 2 and server.stats()["requests"] == 2 and rep2.written
    assert llm_store().failures("llm_description") == []


def test_malformed_or_empty_is_a_failure_never_a_description(server):
    make_toy(n=6)
    server.set_faults({"Charlie": ["malformed"] * 3, "Delta": ["empty"] * 3, "Echo": ["badshape"] * 3})
    rep = aug.augment("toy", model="fake-model", concurrency=3, progress=False, allow_partial=True, **FAST)
    assert rep.failed_by_reason == {"malformed": 2, "empty": 1}
    prompts = server.chat_prompts()
    assert all(sum(w in p for p in prompts) == 3 for w in ("Charlie", "Delta", "Echo"))  # max_attempts, no more
    plus = datasets.load("toy+").entities.set_index("name")
    assert plus.loc["Person Delta", "description"] == "original description 3"  # kept, and labelled
    assert "no LLM answer" in plus.loc["Person Delta", "description_source"]
    assert plus.loc["Person Alpha", "description_source"] == "llm:fake-model:who-is@1"
    store = llm_store()
    assert store.count("llm_description") == 3
    assert all(v["value"]["description"].startswith("Fake LLM answer") for v in store.items("llm_description"))

    server.set_faults(None)
    server.reset()
    rep2 = aug.augment("toy", model="fake-model", progress=False, **FAST)  # retried on the next run
    assert rep2.done == 3 and rep2.failed == 0 and server.stats()["requests"] == 3
    assert (datasets.load("toy+").entities["description_source"] == "llm:fake-model:who-is@1").all()


def test_malformed_or_empty_answers_are_asked_again_in_the_same_run(server):
    make_toy(n=6)
    server.set_faults({"Charlie": ["malformed", "empty"], "Delta": ["empty", "badshape"], "Echo": ["malformed"]})
    rep = aug.augment("toy", model="fake-model", concurrency=3, progress=False, **FAST)
    assert (rep.done, rep.failed, rep.written) == (6, 0, True)  # one run, no rerun needed
    assert rep.errors_by_reason == {"malformed": 3, "empty": 2} and rep.retries == 5 and rep.requests == 11
    prompts = server.chat_prompts()
    assert [sum(w in p for p in prompts) for w in ("Charlie", "Delta", "Echo", "Alpha")] == [3, 3, 2, 1]
    plus = datasets.load("toy+").entities.set_index("name")
    assert plus.loc["Person Charlie", "description"] == fake_answer(prompt_of("Person Charlie", "Q102"))


def test_a_persistently_malformed_answer_fails_after_the_bound_named_in_the_report(server, capsys):
    make_toy(n=4)
    server.set_faults({"Charlie": ["malformed"] * 10})
    rep = aug.augment("toy", model="fake-model", max_attempts=2, progress=False, **FAST)
    assert (rep.done, rep.failed, rep.failed_by_reason, rep.written) == (3, 1, {"malformed": 1}, False)
    assert sum("Charlie" in p for p in server.chat_prompts()) == 2
    (example,) = rep.failed_examples
    assert example["name"] == "Person Charlie" and "2 times" in example["detail"]
    assert "failed: Q102 ('Person Charlie'): malformed" in rep.summary() and rep.exit_code == 1
    assert cli.main(["augment", "toy", "--model", "fake-model", "--max-attempts", "2", "--no-progress"]) == 1
    assert "Person Charlie" in capsys.readouterr().out


def test_fatal_error_stops_the_run(server):
    make_toy(n=20)
    server.set_faults(lambda prompt, n: "401")  # the key is revoked after the endpoint check
    rep = aug.augment("toy", model="fake-model", concurrency=2, progress=False, **FAST)
    assert rep.aborted and rep.aborted.startswith("auth")
    assert rep.requests <= 2 and rep.not_attempted >= 18 and not rep.written
    assert KEY not in json.dumps(rep.to_dict())


def test_a_spent_quota_stops_the_run_at_once_instead_of_retrying(server, capsys):
    """OpenAI answers a spent quota with a 429 that no wait cures: no retries, no rate-limit back-off."""
    make_toy(n=20)
    server.set_faults(lambda prompt, n: "quota")
    rep = aug.augment("toy", model="fake-model", concurrency=2, max_retries=5, progress=False, **FAST)
    assert rep.aborted and rep.aborted.startswith("quota") and "quota or credit is spent" in rep.aborted
    assert server.stats()["requests"] <= 2, "one request per worker, none retried"
    assert rep.not_attempted >= 18 and not rep.written and rep.rate_limited == 0
    assert cli.main(["augment", "toy", "--model", "fake-model", "--no-progress"]) != 0
    assert "ABORTED: quota" in capsys.readouterr().out


def test_a_failing_store_stops_the_run_loudly(server):
    class FullDisk(Store):
        calls = 0

        def put_many(self, rows, **kw):
            FullDisk.calls += 1
            if FullDisk.calls > 2:
                raise sqlite3.OperationalError("database or disk is full")
            return super().put_many(rows, **kw)

    make_toy(n=30)
    store = FullDisk(default_store_path("llm"))
    with pytest.raises(DimkitError, match="writing to the store .* failed.*disk is full"):
        aug.augment("toy", model="fake-model", concurrency=2, store=store, progress=False, **FAST)
    assert 1 <= store.count("llm_description") < 30 and server.stats()["requests"] < 30
    assert not (paths.data_dir() / "toy+").exists()


# ------------------------------------------------------------------------------------------------
# Fail fast, replay, dry run
# ------------------------------------------------------------------------------------------------
def test_missing_key_or_unreachable_endpoint_fails_before_any_work(server, monkeypatch):
    make_toy(n=5)
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(DimkitError, match="OPENAI_API_KEY"):
        aug.augment("toy", model="fake-model", progress=False)
    with pytest.raises(DimkitError, match="rejected the API key"):
        aug.augment("toy", model="fake-model", api_key="wrong", progress=False)
    assert server.stats()["requests"] == 0  # the /models check is not a chat request
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with pytest.raises(DimkitError, match="cannot reach the LLM endpoint http://127.0.0.1:9/v1"):
        aug.augment("toy", model="fake-model", base_url="http://127.0.0.1:9/v1", progress=False)
    assert llm_store().count() == 0 and not (paths.data_dir() / "toy+").exists()
    # Through the CLI: one line, exit 2.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert cli.main(["augment", "toy", "--model", "fake-model", "--no-progress"]) == 2


def test_no_key_needed_when_everything_is_stored(server, monkeypatch):
    make_toy(n=5)
    aug.augment("toy", model="fake-model", progress=False)
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("OPENAI_BASE_URL")
    rep = aug.augment("toy", model="fake-model", progress=False)
    assert rep.written and rep.cached == 5 and rep.requests == 0


def test_replay_fails_naming_the_missing_entity(server, tmp_path):
    make_toy(n=5)
    answers = {"model": "fake-model", "template": "who-is",
               "answers": {f"Q{100 + i}": f"stored answer {i}" for i in range(5) if i != 2}}
    path = tmp_path / "answers.json"
    path.write_text(json.dumps(answers))
    with pytest.raises(DimkitError, match=r"Q102 \('Person Charlie'\).*1 of 5"):
        aug.augment("toy", model="fake-model", replay=True, answers=str(path), progress=False)
    assert server.stats()["requests"] == 0
    answers["answers"]["Q102"] = "stored answer 2"
    path.write_text(json.dumps(answers))
    rep = aug.augment("toy", model="fake-model", replay=True, answers=str(path), progress=False)
    assert rep.written and rep.requests == 0 and server.stats()["requests"] == 0
    assert rep.imported == 1 and rep.cached == 4  # the first call imported four before failing
    assert datasets.load("toy+").entities["description"].tolist()[:3] == [
        "stored answer 0", "stored answer 1", "stored answer 2"]
    with pytest.raises(ConfigError, match="holds answers of model 'fake-model'"):
        aug.augment("toy", model="gpt-4o-mini", answers=str(path), progress=False)


def test_dry_run_counts_and_estimates_without_calling(server, monkeypatch, capsys):
    make_toy(n=10)
    store = llm_store()
    tmpl = aug.get_template("who-is")
    half = {f"Q{100 + i}": f"answer {i}" for i in range(4)}
    path = paths.cache_dir() / "half.json"
    path.write_text(json.dumps({"model": "gpt-4o-mini", "answers": half}))
    assert aug.import_answers(path, "toy", store=store) == 4
    assert aug.import_answers(path, "toy", store=store) == 0  # idempotent
    monkeypatch.delenv("OPENAI_API_KEY")  # a dry run needs no key
    rep = aug.augment("toy", model="gpt-4o-mini", dry_run=True)
    assert (rep.entities, rep.cached, rep.requested) == (10, 4, 6)
    e = rep.estimate
    assert e["requests"] == 6 and e["prompt_tokens"] > 6 * 20 and e["completion_tokens"] == 6 * tmpl.max_tokens
    assert e["cost_usd"] > 0 and e["cost_usd_batch"] == pytest.approx(e["cost_usd"] / 2, abs=1e-4)
    assert server.stats()["requests"] == 0 and not (paths.data_dir() / "toy+").exists()
    assert cli.main(["augment", "toy", "--model", "gpt-4o-mini", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 stored, 6 would be requested" in out and "cost $" in out


# ------------------------------------------------------------------------------------------------
# kill -9 and resume
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_kill_9_mid_run_then_resume_completes_without_duplicates(server):
    n = 120
    make_toy(n=n)
    server.latency = 0.1  # ~40 answers/s with 4 workers: the kill lands mid-run
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "dimkit.cli", "augment", "toy", "--model", "fake-model",
           "--concurrency", "4", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store_path = default_store_path("llm")
    deadline = time.monotonic() + 40
    stored = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if store_path.exists():
            with Store(store_path) as s:
                stored = s.count("llm_description")
            if stored >= 20:
                break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    con = sqlite3.connect(store_path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    with Store(store_path) as s:
        before = {r["item"] for r in s.items("llm_description")}
    assert 20 <= len(before) < n
    assert not (paths.data_dir() / "toy+" / "meta.json").exists()

    server.reset()
    server.latency = 0.0
    rep = aug.augment("toy", model="fake-model", concurrency=8, progress=False)
    asked = server.chat_prompts()
    names = dict(zip(datasets.load("toy").entities["qid"], datasets.load("toy").entities["name"]))
    assert len(asked) == len(set(asked)) == n - len(before)           # each missing entity once
    assert not any(prompt_of(names[q], q) in asked for q in before)   # nothing stored is asked again
    assert rep.cached == len(before) and rep.done == n - len(before) and rep.written
    plus = datasets.load("toy+").entities
    assert plus["qid"].is_unique and len(plus) == n
    assert (plus["description_source"] == "llm:fake-model:who-is@1").all()


# ------------------------------------------------------------------------------------------------
# Batch API mode (beyond the anchors)
# ------------------------------------------------------------------------------------------------
def test_batch_mode_submits_polls_and_ingests_into_the_same_store(server):
    make_toy(n=10)
    server.set_faults({"Charlie": ["empty"], "Delta": ["500"], "Echo": ["quota"]})
    rep = aug.augment("toy", model="gpt-4o-mini", batch=True, batch_poll_s=0.05, progress=False)
    assert rep.mode == "batch" and len(rep.batches) == 1 and rep.batches[0]["status"] == "completed"
    # a request refused for a spent credit inside the batch is "quota", not "rate_limited"
    assert rep.done == 7 and rep.failed_by_reason == {"empty": 1, "server_error": 1, "quota": 1}
    assert not rep.written
    assert all("batch" in r for r in server.records)  # nothing went through the live endpoint
    live_equivalent = estimate_cost("gpt-4o-mini", rep.prompt_tokens, rep.completion_tokens)
    assert rep.cost_usd == pytest.approx(live_equivalent / 2, abs=1e-6)
    # A live rerun finds the batch answers in the store: only the three failures are asked again.
    server.set_faults(None)
    server.reset()
    rep2 = aug.augment("toy", model="gpt-4o-mini", progress=False, **FAST)
    assert rep2.cached == 7 and rep2.done == 3 and server.stats()["requests"] == 3 and rep2.written


def test_batch_mode_with_a_spent_quota_fails_at_the_upload_without_retrying(server):
    make_toy(n=6)
    server.quota_spent = True
    with pytest.raises(DimkitError, match=r"Batch API: upload failed .*quota or credit is spent"):
        aug.augment("toy", model="fake-model", batch=True, max_retries=5, batch_poll_s=0.05, progress=False)
    assert server.quota_refusals == 1 and not server.batches  # asked once, not max_retries more times


def test_batch_interrupted_is_resumed_not_resubmitted(server):
    make_toy(n=6)
    server.batch_delay_s = 0.3
    rep = aug.augment("toy", model="fake-model", batch=True, batch_wait=False, progress=False)
    assert rep.batches_pending == 1 and rep.requests == 6 and not rep.written and "rerun" in str(rep)
    assert len(server.batches) == 1
    rep2 = aug.augment("toy", model="fake-model", batch=True, batch_poll_s=0.05, progress=False)
    assert len(server.batches) == 1 and rep2.batches[0]["resumed"] and rep2.requests == 0
    assert rep2.done == 6 and rep2.written and rep2.batches_pending == 0
    rep3 = aug.augment("toy", model="fake-model", batch=True, progress=False)
    assert rep3.requests == 0 and rep3.batches == [] and len(server.batches) == 1


# ------------------------------------------------------------------------------------------------
# The bundled sample replays its synthetic answers
# ------------------------------------------------------------------------------------------------
def test_sample_replays_shipped_answers_with_zero_requests(kit_dirs, monkeypatch):
    if not (paths.sample_source_dir() / aug.ANSWERS_FILE).exists():
        pytest.skip("bundled sample not generated yet")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # would fail if anything were sent
    rep = aug.augment("sample", model=aug.SAMPLE_ORACLE, replay=True, progress=False)
    assert rep.written and rep.requests == 0 and rep.synthetic_answers and "SYNTHETIC" in str(rep)
    assert rep.imported == rep.entities
    plus = datasets.load("sample+")
    assert plus.meta["synthetic_answers"] is True and "SYNTHETIC" in plus.meta["note"]
    assert (plus.entities["description_source"] == "llm:sample-oracle:who-is@1").all()
    shipped = json.loads((paths.sample_source_dir() / aug.ANSWERS_FILE).read_text())["answers"]
    assert dict(zip(plus.entities["qid"], plus.entities["description"])) == {
        q: shipped[q].strip() for q in plus.entities["qid"]}
    assert plus.image_path(plus.mentions["image"].dropna().iloc[0]).parent.is_dir()
    again = aug.augment("sample", model=aug.SAMPLE_ORACLE, replay=True, progress=False)
    assert again.imported == 0 and again.cached == rep.entities
    with pytest.raises(ConfigError, match="already an augmented dataset"):
        aug.augment("sample+", model=aug.SAMPLE_ORACLE, replay=True)


# ------------------------------------------------------------------------------------------------
# The output folder: never overwritten by surprise, replaced whole
# ------------------------------------------------------------------------------------------------
def test_out_naming_another_dataset_is_refused_unless_forced_then_replaced_whole(server, capsys):
    make_toy("toy", n=6)
    other = make_toy("other", n=9)  # a prepared dataset with candidates, images and a report
    (other / "reports").mkdir()
    (other / "reports" / "images.json").write_text("{}")
    before = sorted(p.name for p in other.iterdir())
    rc = cli.main(["augment", "toy", "--model", "fake-model", "--out", "other", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "holds the prepared dataset 'other' (9 mentions" in err and "--force" in err
    assert "Traceback" not in err and server.stats()["requests"] == 0  # refused before any request
    assert sorted(p.name for p in other.iterdir()) == before
    assert len(datasets.load("other").mentions) == 9
    with pytest.raises(ConfigError, match="force=True"):
        aug.augment("toy", model="fake-model", out="other", progress=False)

    rep = aug.augment("toy", model="fake-model", out="other", force=True, progress=False)
    assert rep.written
    ds = datasets.load("other")
    assert len(ds.mentions) == 6 and ds.meta["augmented_from"] == "toy"
    assert not (other / "reports").exists()  # nothing of the old folder is merged in
    assert len(ds.candidates) == 6 and set(ds.candidates["mention_id"]) == set(ds.mentions["mention_id"])
    assert os.readlink(other / "images") == "../toy/images"
    assert not [p for p in paths.data_dir().iterdir() if p.name.startswith(".")]  # no staging left


def test_out_of_another_model_is_refused_and_a_rerun_of_the_same_build_rewrites_nothing(server):
    make_toy("toy", n=4)
    aug.augment("toy", model="fake-model", progress=False)
    plus = paths.data_dir() / "toy+"
    (plus / "reports").mkdir()
    (plus / "reports" / "images.json").write_text("{}")  # what a later stage wrote into toy+
    stamp = (plus / "meta.json").stat().st_mtime_ns
    rep = aug.augment("toy", model="fake-model", progress=False)  # the same build again
    assert rep.written and (plus / "meta.json").stat().st_mtime_ns == stamp and (plus / "reports").exists()
    with pytest.raises(ConfigError, match="augmented from 'toy' with model 'fake-model'"):
        aug.augment("toy", model="other-model", progress=False)
    assert datasets.load("toy+").meta["augment"]["model"] == "fake-model"


def test_answers_file_with_a_byte_order_mark_is_read_and_latin1_is_named(server, tmp_path):
    make_toy(n=3)
    path = tmp_path / "answers.json"
    answers = {"model": "fake-model", "answers": {f"Q{100 + i}": f"Réponse {i}" for i in range(3)}}
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(answers, ensure_ascii=False).encode())
    rep = aug.augment("toy", model="fake-model", replay=True, answers=str(path), progress=False)
    assert rep.written and rep.imported == 3
    path.write_bytes(json.dumps(answers, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(aug.DataError, match="not UTF-8 text"):
        aug.import_answers(path, "toy")


def test_tqdm_disable_is_honoured(server, capsys, monkeypatch):
    """TQDM_DISABLE (what CI and the rehearsal set) switches the progress bar off; progress=True must not
    turn it back on."""
    monkeypatch.setenv("TQDM_DISABLE", "1")
    make_toy(n=3)
    aug.augment("toy", model="fake-model")
    assert "entity/s" not in capsys.readouterr().err


def test_a_pending_batch_is_not_paid_again_by_a_live_run_or_counted_by_a_dry_run(server, capsys):
    make_toy(n=4)
    server.batch_delay_s = 3600  # still running on the endpoint
    rep = aug.augment("toy", model="fake-model", batch=True, batch_wait=False, progress=False)
    assert rep.batches_pending == 1 and len(server.batches) == 1
    batch_id = rep.batches[0]["id"]
    make_toy(n=6)  # two entities more, which no batch covers
    rc = cli.main(["augment", "toy", "--model", "fake-model", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "2 would be requested" in out
    assert f"4 entities wait in batch {batch_id}: rerun with --batch to collect them" in out
    live = aug.augment("toy", model="fake-model", progress=False, **FAST)
    # only the two entities outside the batch are asked live; the four wait for the batch
    assert sorted(server.chat_prompts()) == sorted(prompt_of(f"Person {w}", f"Q{100 + i}")
                                                   for i, w in enumerate(WORDS[:6]) if i >= 4)
    assert live.done == 2 and live.requested == 2 and not live.written and live.exit_code == 0
    assert live.batches_waiting == [{"id": batch_id, "entities": 4}]
    assert f"4 entities wait in batch {batch_id}: rerun with batch=True to collect them" in str(live)
    assert "not written" not in str(live)
    server.batch_delay_s = 0.0
    collected = aug.augment("toy", model="fake-model", batch=True, batch_poll_s=0.05, progress=False)
    assert collected.done == 4 and collected.written and len(server.batches) == 1  # nothing submitted again
    assert collected.batches_waiting == []


def test_a_batch_the_endpoint_forgot_is_marked_lost_and_its_entities_asked_again(server):
    make_toy(n=5)
    server.batch_delay_s = 3600
    rep = aug.augment("toy", model="fake-model", batch=True, batch_wait=False, progress=False)
    lost_id = rep.batches[0]["id"]
    server.batches.clear()  # the endpoint no longer knows it (HTTP 404 on poll)
    server.batch_delay_s = 0.0
    rep2 = aug.augment("toy", model="fake-model", batch=True, batch_poll_s=0.05, progress=False)
    assert rep2.batches_lost == [{"id": lost_id, "entities": 5, "resubmitted": True}]
    assert [b["status"] for b in rep2.batches] == ["lost", "completed"] and len(server.batches) == 1
    assert rep2.done == 5 and rep2.written
    assert f"batch {lost_id} is unknown to the endpoint (HTTP 404): marked lost" in str(rep2)
    states = {r["item"]: r["value"]["state"] for r in llm_store().items(aug.BATCH_KIND)}
    assert states[lost_id] == "lost"
    # never resumed again: a rerun finds everything stored
    rep3 = aug.augment("toy", model="fake-model", batch=True, progress=False)
    assert rep3.batches == [] and rep3.batches_lost == [] and rep3.written


def test_a_batch_forgotten_while_waiting_fails_its_entities_for_a_rerun(server, monkeypatch):
    make_toy(n=3)
    with monkeypatch.context() as m:
        m.setattr(server, "poll_batch", lambda bid: None)  # every poll answers 404
        rep = aug.augment("toy", model="fake-model", batch=True, batch_poll_s=0.05, progress=False)
    assert rep.failed_by_reason == {"batch_lost": 3} and rep.batches_pending == 0 and not rep.written
    assert rep.batches_lost[0]["resubmitted"] is False and "rerun to ask for them again" in str(rep)
    again = aug.augment("toy", model="fake-model", batch=True, batch_poll_s=0.05, progress=False)
    assert again.done == 3 and again.written and again.batches_lost == []


def test_out_of_another_dataset_family_an_original_or_raw_is_refused(kit_dirs, capsys):
    make_toy(n=3)
    for out in ("wiki+", "wikimel+", "richpediamel_plus", "richpediamel", "rich", "wikidiverse", "sample",
                "sample+", "raw"):
        with pytest.raises(ConfigError, match="out"):
            aug.AugmentConfig.for_dataset("toy", model="fake-model", out=out).validate()
    for out in ("mydata+", "toy+", "mine"):  # names of one's own stay allowed
        assert aug.AugmentConfig.for_dataset("toy", model="fake-model", out=out).validate().out == out
    assert aug.AugmentConfig.for_dataset("sample", model="sample-oracle", out="sample+").validate().out == "sample+"
    assert aug.AugmentConfig.for_dataset("wiki", out="wiki+").validate().out == "wikimel+"
    raw = paths.data_dir() / "raw"
    raw.mkdir()
    for out in ("wiki+", "richpediamel", "raw"):
        rc = cli.main(["augment", "sample", "--model", "sample-oracle", "--replay", "--out", out, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "--out" in err and "Traceback" not in err, err
    assert sorted(p.name for p in paths.data_dir().iterdir()) == ["raw", "toy"] and not any(raw.iterdir())


def test_an_invalid_base_url_is_a_named_error_that_shows_no_secret(server, monkeypatch, capsys):
    make_toy(n=2)
    for url in ("http://bob:pw_TOPSECRET@h:99999/v1?api-key=QSECRET", "http://bob:pw_TOPSECRET@h:18001:/v1"):
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        with pytest.raises(ConfigError, match="OPENAI_BASE_URL 'http://h:.*' is not a valid URL") as ei:
            Endpoint.resolve()
        assert "TOPSECRET" not in str(ei.value) and "QSECRET" not in str(ei.value)
        assert cli.main(["augment", "toy", "--model", "fake-model", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "not a valid URL" in err and "TOPSECRET" not in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="base_url 'http://h:99999/v1' is not a valid URL"):
        Endpoint.resolve("http://h:99999/v1")
    assert server.stats()["requests"] == 0
