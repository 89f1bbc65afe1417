"""Expert cues: replay files, the store, a tiny random BLIP-2, an OpenAI-compatible server, the sample."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import tinymedia
from dimkit import cues, datasets, experts, shards
from dimkit.errors import ConfigError, DimkitError


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """Fresh data and cache folders."""
    monkeypatch.setenv("DIMKIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


def run_cues(ds, expert="auto", *, progress: bool = False, **settings):
    """Cues of a dataset (a name or loaded) through the stage (``cues.run``); ``expert``: a spec or an Expert."""
    obj = expert if isinstance(expert, experts.Expert) else None
    name = ds if isinstance(ds, str) else ds.name
    cfg = cues.CuesConfig.for_dataset(name, **({} if obj else {"expert": expert}), **settings)
    return cues.run(cfg, dataset=None if isinstance(ds, str) else ds, expert=obj, progress=progress)


@pytest.fixture(scope="module")
def blip2_folder(tmp_path_factory):
    """A tiny random BLIP-2 saved like a downloaded checkpoint."""
    return tinymedia.tiny_blip2(tmp_path_factory.mktemp("blip2") / "tiny-blip2")


def test_replay_file_cues_and_unusable_images(env):
    ds = tinymedia.make_dataset(env / "data")
    cue_file = tinymedia.write_cue_file(env / "cues.json")
    res = run_cues(ds, f"replay:{cue_file}", progress=False)
    got = res.cues.to_dict()
    assert got["m1"] == got["m4"] == "a teal boat on blue water"   # shared image, asked once
    assert got["m2"] == "an orange ring" and got["m3"] == "a blue mountain"
    assert got["m5"] is None and got["m6"] is None and got["m7"] is None
    status = dict(zip(res.table["mention_id"], res.table["cue_status"]))
    assert status["m5"] == "image_missing" and status["m6"] in ("image_corrupt", "image_truncated")
    assert status["m7"] == "image_no_image"
    rep = res.report
    assert (rep.images, rep.done, rep.cached, rep.mentions_with_cue) == (3, 3, 0, 4)
    assert sum(rep.no_usable_image.values()) == 3
    assert rep.no_usable_image["missing"] == 1 and rep.no_usable_image["no_image"] == 1
    # unusable images are flagged in the mentions table too
    flagged = datasets.load("tiny").mentions.set_index("mention_id")["image_status"]
    assert flagged["m5"] == "missing" and flagged["m1"] == "ok"
    saved = json.loads((ds.root / cues.REPORT_FILE).read_text())
    assert saved["expert"] == "test-oracle" and saved["done"] == 3


def test_store_reuse_and_replay_from_store(env, tmp_path):
    ds = tinymedia.make_dataset(env / "data")
    cue_file = tinymedia.write_cue_file(env / "cues.json")
    first = run_cues(ds, f"replay:{cue_file}", progress=False)
    again = run_cues(ds, f"replay:{cue_file}", progress=False)
    assert (again.report.done, again.report.cached) == (0, 3)
    assert again.cues.equals(first.cues)
    # replay by model id: no file, no model, only the store
    ex = experts.make_expert("replay:test-oracle")
    assert ex.version == first.expert.version
    stored = run_cues(ds, ex, progress=False)
    assert stored.cues.equals(first.cues) and stored.report.done == 0
    # an image the store never saw is reported, not invented
    tinymedia.draw(ds.root / "img" / "c.png", (0, 0, 0), 99)
    ds = datasets.load("tiny")
    miss = run_cues(ds, experts.make_expert("replay:test-oracle"), progress=False)
    assert miss.cues["m3"] is None and miss.report.failed == {"not_in_store": 1}


def test_edited_cue_file_is_not_replayed_stale(env):
    ds = tinymedia.make_dataset(env / "data")
    f = tinymedia.write_cue_file(env / "cues.json")
    run_cues(ds, f"replay:{f}", progress=False)
    tinymedia.write_cue_file(f, {**tinymedia.CUES, "b.png": "a red ring"})
    res = run_cues(ds, f"replay:{f}", progress=False)
    assert res.cues["m2"] == "a red ring" and res.report.done == 3


def test_tiny_blip2_batched_equals_single_and_is_reused(env, blip2_folder, monkeypatch):
    ds = tinymedia.make_dataset(env / "data")
    batched = run_cues(ds, f"blip2:{blip2_folder}", batch_size=4, progress=False)
    texts = batched.cues.dropna()
    assert len(texts) == 4 and all(isinstance(t, str) and t for t in texts)
    assert batched.cues["m1"] != batched.cues["m2"]           # answers depend on the image
    assert batched.report.prompt_version == "released@1"      # DIM's exact prompt and 20 tokens
    assert batched.expert.prompt == "Question:  Who are the characters in the picture? Answer: "
    single = run_cues(ds, f"blip2:{blip2_folder}", batch_size=1, force=True, progress=False)
    assert single.cues.equals(batched.cues)                   # batching changes nothing (deterministic)
    # a rerun finds everything stored and never loads the model
    monkeypatch.setattr(experts.TransformersExpert, "_load",
                        lambda self: (_ for _ in ()).throw(AssertionError("model loaded")))
    again = run_cues(ds, f"blip2:{blip2_folder}", progress=False)
    assert again.report.done == 0 and again.cues.equals(batched.cues)


def test_failing_batch_is_bisected_down_to_the_bad_image(monkeypatch):
    """One image that breaks generate() costs a few extra calls and only its own answer."""
    from PIL import Image

    from dimkit_dev.tiny_blip2 import random_blip2

    model, processor = random_blip2("tiny")
    ex = experts.TransformersExpert.from_model(model, processor, model_id="tiny", batch_size=8)
    good = Image.new("RGB", (32, 32), "white")
    bad = Image.new("RGB", (32, 32), "black")
    calls = []

    def fake_generate(images):
        calls.append(len(images))
        if any(im is bad for im in images):
            raise RuntimeError("CUDA out of memory (simulated)")
        return [f"answer {len(images)}" for _ in images]

    monkeypatch.setattr(ex, "_generate", fake_generate)
    items = [experts.CueItem(str(i), None, f"{i}.png", bad if i == 5 else good) for i in range(8)]
    answers = ex.describe(items)
    assert [a.text is None for a in answers] == [i == 5 for i in range(8)]
    assert answers[5].reason == "model_error" and "out of memory" in answers[5].detail
    assert answers[0].text == "answer 4"          # the good half ran as one batch
    assert calls == [8, 4, 4, 2, 1, 1, 2]         # 8, its halves, then down the bad half to image 5


def test_changed_prompt_is_a_new_key(env, blip2_folder):
    ds = tinymedia.make_dataset(env / "data")
    a = run_cues(ds, f"blip2:{blip2_folder}", progress=False, max_new_tokens=3)
    b = run_cues(ds, f"blip2:{blip2_folder}", prompt="Question: What is it? Answer:", progress=False,
                      max_new_tokens=3)
    assert a.report.prompt_version != b.report.prompt_version
    assert b.report.done == 3 and b.report.cached == 0
    assert all(len(t.split()) <= 3 for t in a.cues.dropna())


def test_offline_hub_blip2_says_how_to_supply_a_folder(env):
    ds = tinymedia.make_dataset(env / "data")
    with pytest.raises(DimkitError, match=r"blip2:/path/to/folder"):
        run_cues(ds, "blip2", progress=False)


class _FakeChat(BaseHTTPRequestHandler):
    """Answers POST /v1/chat/completions; the 'b' image gets a 500, the 'c' image empty content."""

    seen: list = []

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeChat.seen.append((self.headers.get("Authorization"), body))
        parts = body["messages"][0]["content"]
        url = next(p["image_url"]["url"] for p in parts if p["type"] == "image_url")
        n = len(_FakeChat.seen)
        import base64
        import io

        from PIL import Image
        img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        red, _, blue = img.getpixel((20, 20))
        if red > 180:            # b.png (orange)
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "boom"}}')
            return
        content = "" if blue > 180 else f"answer {n}"   # c.png (blue) -> empty
        out = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "finish_reason": "stop",
                            "message": {"role": "assistant", "content": content}}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_openai_compatible_endpoint(env, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeChat)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
        _FakeChat.seen = []
        ds = tinymedia.make_dataset(env / "data")
        ex = experts.OpenAIExpert("tiny-vlm", max_retries=0, workers=2)
        res = run_cues(ds, ex, progress=False)
        assert res.cues["m1"].startswith("answer") and res.cues["m4"] == res.cues["m1"]
        assert res.cues["m2"] is None and res.report.failed == {"api_error": 1}
        assert res.cues["m3"] is None and res.report.empty == 1
        auth, body = _FakeChat.seen[0]
        assert auth == "Bearer sk-test-secret" and body["temperature"] == 0
        assert body["messages"][0]["content"][0]["text"] == experts.RELEASED_QUESTION
        # the key never reaches the store or the report
        raw = (env / "cache" / "cues.sqlite").read_bytes()
        assert b"sk-test-secret" not in raw
        from dimkit.store import Store
        with Store(env / "cache" / "cues.sqlite") as st:
            (fail,) = st.failures(cues.KIND)
        assert fail["reason"] == "api_error" and fail["detail"].startswith("HTTP 500") and "boom" in fail["detail"]
        assert "sk-test-secret" not in json.dumps(res.report.to_dict())
        # the failed image is retried next run; the empty answer is not asked again
        n = len(_FakeChat.seen)
        run_cues(ds, ex, progress=False)
        assert len(_FakeChat.seen) == n + 1
    finally:
        server.shutdown()


def test_openai_expert_asks_again_after_a_malformed_or_empty_answer(env, monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from llm_server import FakeLLMServer

    faults = {0: "malformed", 1: "empty"}  # each image: broken JSON, then empty content, then an answer
    with FakeLLMServer(api_key="sk-test-secret", faults=lambda prompt, n: faults.get(n)) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
        ds = tinymedia.make_dataset(env / "data")
        res = run_cues(ds, experts.OpenAIExpert("tiny-vlm", workers=2), progress=False)
        rep = res.report
        assert rep.images == 3 and rep.done == 3 and rep.failed == {} and rep.empty == 0
        assert res.cues["m1"].startswith("Fake LLM answer")
        prompts = srv.chat_prompts()
        assert len(prompts) == 9 and all(prompts.count(p) == 3 for p in prompts)
        srv.set_faults(lambda prompt, n: "malformed")  # never usable: fails after max_attempts
        srv.reset()
        from PIL import Image

        item = experts.CueItem("x", Path("x.png"), "x.png", Image.new("RGB", (32, 32), (9, 9, 9)))
        (answer,) = experts.OpenAIExpert("tiny-vlm", max_attempts=2).describe([item])
        assert answer.text is None and answer.reason == "bad_response" and "2 times" in answer.detail
        assert len(srv.chat_prompts()) == 2


def test_a_refused_key_stops_the_cue_run_at_once_and_all_failed_exits_1(env, monkeypatch, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from dimkit.cli import main
    from llm_server import FakeLLMServer

    tinymedia.make_dataset(env / "data")
    with FakeLLMServer(api_key="sk-right") as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-secret")
        assert main(["cues", "tiny", "--expert", "openai:tiny-vlm", "--workers", "1"]) == 2
        err = capsys.readouterr().err
        assert "refused model 'tiny-vlm' (auth)" in err and "Traceback" not in err
        assert "sk-wrong-secret" not in err and srv.refused_keys == 1  # not one request per image
        from dimkit.store import Store
        with Store(env / "cache" / "cues.sqlite") as st:
            assert st.failures(cues.KIND) == []  # images not asked are not recorded as failed
        # refused midway through a batch: the answers already given are stored, a rerun asks only the rest
        monkeypatch.setenv("OPENAI_API_KEY", "sk-right")
        asked = []
        srv.set_faults(lambda prompt, n: "401" if asked.append(prompt) or len(asked) == 3 else None)
        assert main(["cues", "tiny", "--expert", "openai:tiny-vlm", "--workers", "1"]) == 2
        capsys.readouterr()
        srv.set_faults(None)
        srv.reset()
        assert main(["cues", "tiny", "--expert", "openai:tiny-vlm"]) == 0
        assert "computed now 1, reused 2" in capsys.readouterr().out and len(srv.chat_prompts()) == 1
        # every image failing for a reason that is not fatal: the run ends, and says so by its status
        srv.set_faults(lambda prompt, n: "malformed")
        assert main(["cues", "tiny", "--expert", "openai:tiny-vlm", "--force"]) == 1
        assert "failed (retried next run): bad_response 3" in capsys.readouterr().out


def test_sample_oracle_on_the_bundled_sample(env):
    res = run_cues("sample", progress=False)
    rep = res.report
    assert rep.expert == "sample-oracle" and rep.synthetic
    assert "synthetic" in str(rep) and "not comparable" in rep.note
    assert rep.mentions == 700 and rep.mentions_with_cue == 696
    assert sum(rep.no_usable_image.values()) == 4
    assert res.cues["train-00003"] == "a teal boat on blue water"
    fig = cues.show_cues("sample", res, n=4)
    assert "synthetic" in fig._suptitle.get_text()
    assert cues.default_expert("sample+") == "sample-oracle"


def test_expert_specs():
    assert isinstance(experts.make_expert("none"), experts.NoExpert)
    assert experts.make_expert("blip2").model_id == experts.DEFAULT_BLIP2   # lazy: nothing loaded
    assert experts.make_expert("openai:gpt-4o-mini", base_url="http://localhost:1/v1").model_id == \
        "openai-chat:gpt-4o-mini@localhost:1"
    with pytest.raises(ConfigError):
        experts.make_expert("wizard")
    with pytest.raises(ConfigError):
        experts.make_expert("blip2", temperature=3)
    assert shards.parse_shard("1/3") == shards.Shard(1, 3) and shards.parse_shard("0/1") is None


def test_cli(env, capsys):
    from dimkit.cli import main

    tinymedia.make_dataset(env / "data")
    f = tinymedia.write_cue_file(env / "cues.json")
    assert main(["cues", "tiny", "--expert", f"replay:{f}"]) == 0
    out = capsys.readouterr().out
    assert "test-oracle" in out and "missing 1" in out
