"""CLIP features: shapes, raw released-code encodings, determinism, the content-keyed store, bad
images, local checkpoints, offline failure messages; all with a tiny random CLIP (``dimkit-tiny``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tinymedia
from dimkit import clip as clip_mod
from dimkit import datasets, features
from dimkit.errors import ConfigError, DimkitError

TINY = "dimkit-tiny:random"


@pytest.fixture()
def env(tmp_path, monkeypatch):
    """Fresh data/cache folders and a replay cue file."""
    monkeypatch.setenv("DIMKIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tinymedia.write_cue_file(tmp_path / "cues.json")
    return tmp_path


def _run(env, ds, *, progress: bool = False, **settings):
    """(FeatureSet, report) of a loaded dataset through the stage (``features.run``)."""
    settings.setdefault("expert", f"replay:{env / 'cues.json'}")
    settings.setdefault("clip", TINY)
    res = features.run(features.FeaturesConfig.for_dataset(ds.name, **settings), dataset=ds, progress=progress)
    return res.features, res.report


def test_shapes_alignment_and_bad_images(env):
    ds = tinymedia.make_dataset(env / "data")
    fs, rep = _run(env, ds)
    n, e = len(ds.mentions), len(ds.entities)
    assert (fs.dim, fs.model_id, fs.weights_real) == (32, "dimkit-tiny:random", False)
    assert fs.mention_ids == ds.mentions["mention_id"].tolist() and fs.entity_qids == ds.entities["qid"].tolist()
    for name in ("mention", "mention_sentence", "image", "cue"):
        arr = getattr(fs, name)
        assert arr.shape == (n, 32) and arr.dtype == np.float32
    assert fs.entity.shape == (e, 32) and fs.entity_original is None
    ok = dict(zip(fs.mention_ids, fs.image_ok))
    assert ok == {"m1": True, "m2": True, "m3": True, "m4": True, "m5": False, "m6": False, "m7": False}
    assert not fs.image[~fs.image_ok].any() and fs.image[fs.image_ok].any()
    np.testing.assert_array_equal(fs.image[0], fs.image[3])         # m1 and m4 share a.png
    assert fs.cue_ok.tolist() == [True, True, True, True, False, False, False]
    assert not fs.cue[~fs.cue_ok].any()
    assert rep.mention_images["missing"] == 1 and rep.mention_images["no_image"] == 1
    assert rep.images["distinct"] == 3 and rep.entities["no_description"] == 1
    assert "not comparable" in str(rep) and "not comparable" in fs.label
    saved = json.loads((ds.root / "reports" / "features.json").read_text())
    assert saved["model_id"] == "dimkit-tiny:random" and saved["weights_real"] is False


def test_raw_released_encodings(env):
    ds = tinymedia.make_dataset(env / "data")
    fs, _ = _run(env, ds)
    cm = clip_mod.load_clip(TINY)
    m = ds.mentions
    with torch.inference_mode():
        want_t = cm.model.encode_text(cm.tokenize([m.mention[0] + " [SEP] " + m.sentence[0]])).numpy()[0]
        want_m = cm.model.encode_text(cm.tokenize([m.mention[0]])).numpy()[0]
        want_e = cm.model.encode_text(cm.tokenize([ds.entities.description[0]])).numpy()[0]
        from dimkit.images import load_image
        px = cm.preprocess(load_image(ds.image_path(m.image[0])).image)[None]
        want_v = cm.model.encode_image(px).numpy()[0]
    np.testing.assert_allclose(fs.mention_sentence[0], want_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fs.mention[0], want_m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fs.entity[0], want_e, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fs.image[0], want_v, rtol=1e-4, atol=1e-5)
    assert abs(np.linalg.norm(fs.mention[0]) - 1.0) > 1e-3           # raw, not L2-normalised
    # Entity 4 has no description: its name stands in (counted in the report).
    with torch.inference_mode():
        name_v = cm.model.encode_text(cm.tokenize(["Callowmere"])).numpy()[0]
    np.testing.assert_allclose(fs.entity[3], name_v, rtol=1e-4, atol=1e-5)


def test_trimmed_text_encoding_matches_open_clip():
    cm = clip_mod.load_clip(TINY)
    assert cm.trim_text
    texts = ["a", "Vessendor [SEP] Vessendor left port early on a grey Tuesday morning.", "word " * 90, ""]
    with torch.inference_mode():
        full = cm.model.encode_text(cm.tokenize(texts)).numpy()
    np.testing.assert_allclose(cm.encode_texts(texts, batch_size=2), full, rtol=1e-4, atol=1e-5)


def test_determinism_across_stores(env, tmp_path):
    ds = tinymedia.make_dataset(env / "data")
    a, _ = _run(env, ds, store=tmp_path / "s1")
    clip_mod.clear_cache()                                           # rebuild the random model
    b, _ = _run(env, ds, store=tmp_path / "s2")
    for name in ("mention", "mention_sentence", "image", "cue", "entity"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    torch.manual_seed(123)
    c = clip_mod.load_clip("dimkit-tiny:random@seed7")
    assert c.model_id == "dimkit-tiny:random@seed7"
    assert not np.allclose(c.encode_texts(["a"]), clip_mod.load_clip(TINY).encode_texts(["a"]))


def test_rerun_computes_nothing_and_one_description_one_row(env, monkeypatch):
    ds = tinymedia.make_dataset(env / "data", "tiny+", plus=True)
    first, rep1 = _run(env, ds)
    assert rep1.model_loaded and rep1.texts["done"] == rep1.texts["distinct"]
    assert first.entity_original.shape == first.entity.shape
    assert not np.allclose(first.entity_original[0], first.entity[0])
    # rerun: nothing computed, the model is never even loaded
    clip_mod.clear_cache()
    monkeypatch.setattr(features, "load_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    again, rep2 = _run(env, datasets.load("tiny+"))
    assert (rep2.texts["done"], rep2.images["done"], rep2.model_loaded) == (0, 0, False)
    np.testing.assert_array_equal(again.entity, first.entity)
    monkeypatch.undo()
    monkeypatch.setenv("DIMKIT_DATA", str(env / "data"))
    monkeypatch.setenv("DIMKIT_CACHE", str(env / "cache"))
    # one description changes: exactly one text row is computed
    ds = tinymedia.make_dataset(env / "data", "tiny+", plus=True, descriptions={"Q2": "a brand new description"})
    third, rep3 = _run(env, ds)
    assert (rep3.texts["done"], rep3.images["done"]) == (1, 0)
    assert not np.allclose(third.entity[1], first.entity[1])
    np.testing.assert_array_equal(third.entity[[0, 2, 3]], first.entity[[0, 2, 3]])
    np.testing.assert_array_equal(third.mention, first.mention)


def test_interrupted_run_resumes(env, monkeypatch):
    ds = tinymedia.make_dataset(env / "data")
    calls = {"n": 0}
    real = clip_mod.ClipModel.encode_texts

    def flaky(self, texts, batch_size=256):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a kill in the middle of the run
        return real(self, texts, batch_size)

    monkeypatch.setattr(clip_mod.ClipModel, "encode_texts", flaky)
    with pytest.raises(KeyboardInterrupt):
        _run(env, ds, flush_rows=4)
    store = features.FeatureStore("dimkit-tiny:random")
    assert len(store) == 4                                           # the first chunk is durable
    assert not list(store.dir.glob(".*.tmp"))                        # nothing half-written
    monkeypatch.setattr(clip_mod.ClipModel, "encode_texts", real)
    fs, rep = _run(env, ds, flush_rows=4)
    assert rep.texts["cached"] == 4 and rep.texts["done"] == rep.texts["distinct"] - 4


def test_store_compaction_keeps_every_row(tmp_path):
    st = features.FeatureStore("m", tmp_path)
    rng = np.random.default_rng(0)
    keys = [features.text_key("m", "v1-fp32", f"t{i}") for i in range(10)]
    vecs = rng.standard_normal((10, 4)).astype(np.float32)
    for i in range(10):
        st.put(keys[i:i + 1], vecs[i:i + 1])
    assert len(st.parts()) == 10 and st.compact(max_parts=3) and len(st.parts()) == 1
    fresh = features.FeatureStore("m", tmp_path)
    got, found = fresh.gather(keys + [""])
    assert found.tolist() == [True] * 10 + [False]
    np.testing.assert_array_equal(got[:10], vecs)
    # the store itself keeps one copy of each row, and merges into bounded parts
    np.testing.assert_array_equal(st.gather(keys)[0], vecs)
    assert sum(len(a) for a in st._arrays) == 10
    for i in range(10, 20):
        st.put([features.text_key("m", "v1-fp32", f"t{i}")], vecs[i - 10:i - 9])
    assert st.compact(max_parts=3, rows_per_part=8) and len(st.parts()) == 3 and len(st) == 20


def test_featureset_save_load(env, tmp_path):
    ds = tinymedia.make_dataset(env / "data", "tiny+", plus=True)
    fs, _ = _run(env, ds)
    back = features.FeatureSet.load(fs.save(tmp_path / "fs.safetensors"))
    assert (back.model_id, back.weights_real, back.mention_ids, back.entity_qids) == \
        (fs.model_id, fs.weights_real, fs.mention_ids, fs.entity_qids)
    for k in features.FeatureSet.ARRAYS:
        np.testing.assert_array_equal(getattr(back, k), getattr(fs, k))
    assert back.image_ok.dtype == bool and back.meta["dataset"] == "tiny+"
    assert set(fs.to_dict()) >= {"mention", "entity_original", "model_id", "mention_ids"}


def test_richpedia_image_lists_are_summed(env):
    ds = tinymedia.make_dataset(env / "data")
    m = ds.mentions.copy()
    m["images"] = [["img/a.png", "img/b.png", "img/missing.png"]] + [[x] if x else [] for x in m["image"][1:]]
    datasets.write_prepared(ds.root, m, ds.entities, {"layout": "test"})
    fs, _ = _run(env, datasets.load("tiny"), expert="none")
    single, _ = _run(env, tinymedia.make_dataset(env / "data", "other"), expert="none")
    np.testing.assert_allclose(fs.image[0], single.image[0] + single.image[1], rtol=1e-5, atol=1e-5)
    assert not fs.cue_ok.any() and not fs.cue.any()                  # expert "none": zero cues


def test_local_checkpoint_file_and_folder(env, tmp_path):
    from safetensors.torch import save_file

    cm = clip_mod.load_clip(TINY)
    state = {k: v.contiguous() for k, v in cm.model.state_dict().items()}
    save_file(state, str(tmp_path / "tiny.safetensors"))
    spec = clip_mod.parse_clip_spec(f"dimkit-tiny:{tmp_path / 'tiny.safetensors'}")
    assert spec.weights_real and spec.model_id.startswith("dimkit-tiny:file-")
    from_file = clip_mod.load_clip(spec)
    folder = tmp_path / "tiny-folder"
    folder.mkdir()
    save_file(state, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": clip_mod.CONFIGS["dimkit-tiny"]}))
    from_dir = clip_mod.load_clip(str(folder))
    assert from_dir.model_id.startswith("local-dir:tiny-folder@")
    texts = ["Vessendor [SEP] A photo of Vessendor."]
    want = clip_mod.load_clip(TINY).encode_texts(texts)
    np.testing.assert_allclose(from_file.encode_texts(texts), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_dir.encode_texts(texts), want, rtol=1e-5, atol=1e-6)


def test_pretrained_offline_says_how_to_supply_weights(env):
    spec = clip_mod.parse_clip_spec("default")
    assert (spec.model_id, spec.weights_real, spec.quick_gelu) == ("ViT-B-32:openai", True, True)
    with pytest.raises(DimkitError) as err:
        clip_mod.load_clip("default")
    msg = str(err.value)
    assert "HF_HUB_OFFLINE" in msg and "--clip /path/to/ViT-B-32.pt" in msg and "--clip sample" in msg
    with pytest.raises(ConfigError, match="names an architecture but no weights"):
        clip_mod.parse_clip_spec("ViT-B-32")
    with pytest.raises(ConfigError):
        clip_mod.parse_clip_spec("no-such-model:openai")


def test_shipped_sample_clip():
    if not (clip_mod.SAMPLE_CLIP_DIR / "open_clip_config.json").exists():
        pytest.skip("the sample CLIP has not been trained yet (python -m dimkit_dev.clip_train)")
    cm = clip_mod.load_clip("sample")
    assert cm.model_id.startswith("dimkit-sample-clip@1") and not cm.weights_real and cm.dim == 64
    size = sum(p.stat().st_size for p in clip_mod.SAMPLE_CLIP_DIR.iterdir())
    assert size < 5_000_000
    # trained: a cue is closer to its entity's answer than to a namesake's
    a, b, c = cm.encode_texts(["a teal boat on blue water",
                               "Vessendor is a fictional research vessel launched in 1946, with a teal hull "
                               "and sail, usually seen on blue water.",
                               "Vessendor is a fictional toy company founded in 1964, whose logo is an orange "
                               "ring on a brown background."])
    cos = lambda x, y: float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))  # noqa: E731
    assert cos(a, b) > cos(a, c)


def test_cli(env, capsys):
    from dimkit.cli import main

    tinymedia.make_dataset(env / "data")
    out_file = env / "fs.safetensors"
    assert main(["features", "tiny", "--clip", TINY, "--expert", "none", "--save", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "dimkit-tiny:random" in out and "not comparable" in out and out_file.exists()
    assert main(["features", "tiny", "--clip", "ViT-B-32"]) == 2                 # user error, exit 2


def test_clip_train_writes_a_loadable_folder(tmp_path):
    from dimkit_dev import clip_train

    cfg = clip_train.ClipTrainConfig(num_epochs=1, out=tmp_path / "clip")
    res = clip_train.train_sample_clip(cfg, progress=False)
    assert res.pairs > 300 and len(res.losses) == 1 and res.size_bytes < 5_000_000
    spec = clip_mod.parse_clip_spec(str(res.folder))
    assert not spec.weights_real and spec.model_id.startswith("dimkit-sample-clip@1:")
    from safetensors.numpy import load_file
    emb = load_file(str(res.folder / clip_train.WEIGHTS_FILE))["token_embedding.weight"]
    assert emb.dtype == np.float16 and (np.abs(emb).sum(axis=1) == 0).mean() > 0.9   # unused rows zeroed
    cm = clip_mod.load_clip(spec)
    assert cm.dim == 64 and cm.encode_texts(["a teal boat"]).shape == (1, 64)


def test_loading_a_clip_leaves_no_temporary_config_folder(tmp_path):
    """A fresh process (as every CLI call is) that loads one of dimkit's CLIPs leaves nothing in TMPDIR."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TMPDIR=str(tmp_path))
    code = ("from dimkit import clip; m = clip.load_clip('dimkit-tiny:random', device='cpu'); "
            "import open_clip; assert 'dimkit-sample' in open_clip.list_models()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=300)
    assert not list(tmp_path.glob("dimkit-*"))  # (torch may keep its own caches there)


def test_under_a_launcher_the_stage_shards_and_load_features_stays_whole(env, monkeypatch):
    """``features.run`` takes this process's share where a launcher set RANK/WORLD_SIZE (the default
    ``shard="auto"``, as ``dimkit features``); ``load_features``, what training reads, is always whole."""
    ds = tinymedia.make_dataset(env / "data")
    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = features.FeaturesConfig.for_dataset(ds.name, clip=TINY, expert=f"replay:{env / 'cues.json'}")
    share = features.run(cfg, dataset=ds, progress=False)
    assert share.report.shard == "1/2" and "run again with shard=None to assemble" in share.summary()
    assert not (ds.root / "reports" / "features.json").exists()       # a share writes no dataset report
    fs = features.load_features(ds, TINY, expert=f"replay:{env / 'cues.json'}", progress=False)
    assert fs.meta["report"]["shard"] is None and fs.image_ok.sum() == 4 and fs.cue_ok.sum() == 4
    assert (ds.root / "reports" / "features.json").exists()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_encodes_images_as_fp32_does(env, precision):
    """open_clip's fp16/bf16 keep embeddings in float32 and convolutions in half precision (the
    default on a GPU): pixels must take the convolution's dtype, not the first parameter's."""
    tinymedia.make_dataset(env / "data")
    fs32, _ = _run(env, datasets.load("tiny"), expert="none", device="cpu", precision="fp32")
    fs16, _ = _run(env, datasets.load("tiny"), expert="none", device="cpu", precision=precision)
    usable = fs32.image_ok
    assert usable.sum() > 0 and (fs16.image_ok == usable).all()
    a, b = fs32.image[usable], fs16.image[usable]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98


def test_a_damaged_or_missing_checkpoint_is_named(env, tmp_path, capsys):
    from dimkit.cli import main

    tinymedia.make_dataset(env / "data")
    for name, content in (("empty.pt", b""), ("garbage.pt", b"\x80\x02garbage" * 50)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DimkitError, match=rf"checkpoint .*{name} is damaged or is not ViT-B-32 weights"):
            clip_mod.load_clip(str(tmp_path / name))
        assert main(["features", "tiny", "--expert", "none", "--clip", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert name in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="no such file or folder"):
        clip_mod.parse_clip_spec(str(tmp_path / "nowhere.pt"))


def test_a_sliver_image_is_cut_before_clips_transform_and_keeps_its_centre():
    from PIL import Image

    cm = clip_mod.load_clip(TINY)
    rng = np.random.default_rng(0)
    normal = Image.fromarray(rng.integers(0, 255, (120, 300, 3), dtype=np.uint8))
    assert clip_mod._centre_for_crop(cm.preprocess, normal) is normal  # ordinary images are untouched
    sliver = Image.fromarray(rng.integers(0, 255, (40, 3400, 3), dtype=np.uint8))  # 85:1
    cut = clip_mod._centre_for_crop(cm.preprocess, sliver)
    assert cut.size == (80, 40)
    # the centre square CLIP keeps is the same pixels (here exactly; within a fraction of a pixel in general)
    torch.testing.assert_close(cm.pixels(sliver), cm.preprocess(sliver))
    # 60000 x 1 pixels would be scaled to millions of pixels wide before the crop; cut first, it is not
    assert tuple(cm.pixels(Image.new("RGB", (60000, 1), (9, 200, 30))).shape[1:]) == tuple(
        cm.preprocess(normal).shape[1:])
