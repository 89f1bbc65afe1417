"""Two processes fill one cue store and one feature store at once (``--shard auto`` under
accelerate/torchrun sets RANK and WORLD_SIZE); a final unsharded run computes nothing new."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import tinymedia
from dimkit import cues, features

pytestmark = pytest.mark.slow


def compute_features(ds, clip, **settings):
    """(FeatureSet, report) of a loaded dataset through the stage (``features.run``)."""
    res = features.run(features.FeaturesConfig.for_dataset(ds.name, clip=clip, **settings), dataset=ds,
                       progress=False)
    return res.features, res.report


def run_cues(ds, expert, **settings):
    """Cues of a loaded dataset through the stage (``cues.run``)."""
    return cues.run(cues.CuesConfig.for_dataset(ds.name, expert=expert, **settings), dataset=ds, progress=False)


def test_two_processes_share_the_stores(tmp_path, monkeypatch):
    monkeypatch.setenv("DIMKIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = tinymedia.make_dataset(tmp_path / "data", "tiny+", plus=True)
    cue_file = tinymedia.write_cue_file(tmp_path / "cues.json")
    base = [sys.executable, "-m", "dimkit.cli"]
    for stage in (["cues", "tiny+", "--expert", f"replay:{cue_file}"],
                  ["features", "tiny+", "--clip", "dimkit-tiny:random", "--expert", f"replay:{cue_file}"]):
        procs = []
        for rank in (0, 1):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), TQDM_DISABLE="1")
            env.pop("MASTER_ADDR", None)
            procs.append(subprocess.Popen(base + stage + ["--shard", "auto"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all("shard" in o and "without --shard" in o for o in outs)   # no rendezvous: assemble by hand
    # both shards wrote their own part files into the same store
    store = features.FeatureStore("dimkit-tiny:random")
    assert len({p.name.split("-")[2] for p in store.parts()}) == 2   # two writer pids
    fs, rep = compute_features(ds, "dimkit-tiny:random", expert=f"replay:{cue_file}")
    assert (rep.texts["done"], rep.images["done"], rep.model_loaded) == (0, 0, False)
    assert rep.cues["with_cue"] == 4 and fs.image_ok.sum() == 4
    single, _ = compute_features(ds, "dimkit-tiny:random", expert=f"replay:{cue_file}", store=tmp_path / "single",
                                 force=True)
    for name in ("mention", "mention_sentence", "image", "cue", "entity", "entity_original"):
        np.testing.assert_allclose(getattr(fs, name), getattr(single, name), rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accelerate_launch_shards_then_rank0_assembles(tmp_path, monkeypatch):
    """The documented command, for real: `accelerate launch ... -m dimkit.cli cues|features NAME` with
    two CPU processes (accelerate's --multi_gpu path runs torchrun, which also works without GPUs).
    Each process takes its share (a tiny random BLIP-2 for the cues), they meet at the end, and rank 0
    assembles -- computing nothing new -- and writes the dataset's report."""
    import json
    from pathlib import Path

    monkeypatch.setenv("DIMKIT_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("DIMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = tinymedia.make_dataset(tmp_path / "data", "tiny+", plus=True)
    blip2 = tinymedia.tiny_blip2(tmp_path / "tiny-blip2")
    accelerate = Path(sys.executable).with_name("accelerate")
    launch = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "dimkit.cli"]
    env = dict(os.environ, TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    outs = {}
    for stage, args in (("cues", ["cues", "tiny+", "--expert", f"blip2:{blip2}", "--batch-size", "2"]),
                        ("features", ["features", "tiny+", "--clip", "dimkit-tiny:random",
                                      "--expert", f"blip2:{blip2}"])):
        proc = subprocess.run(launch[:1] + ["launch", "--main_process_port", str(_free_port())] + launch[2:] + args,
                              env=env, capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "shard 0/2 done" in out and "shard 1/2 done" in out, out
        assert "all 2 shards done; assembling" in out and "rank 0 assembles" in out, out
        outs[stage] = out

    # rank 0's assembling pass found every cue stored (both shards' answers) and asked nothing
    report = json.loads((ds.root / cues.REPORT_FILE).read_text())
    assert report["shard"] is None and report["done"] == 0 and report["cached"] == report["images"] == 3
    launched = run_cues(ds, f"blip2:{blip2}")
    assert launched.report.done == 0
    single = run_cues(ds, f"blip2:{blip2}", store=tmp_path / "single.sqlite", write_report=False)
    assert single.report.done == 3 and launched.cues.equals(single.cues)

    # the features: both processes wrote part files; the assembled report computed nothing new
    freport = json.loads((ds.root / "reports" / "features.json").read_text())
    assert freport["shard"] is None and freport["texts"]["done"] == 0 and freport["images"]["done"] == 0
    assert freport["model_loaded"] is False
    store = features.FeatureStore("dimkit-tiny:random")
    assert len({p.name.split("-")[2] for p in store.parts()}) == 2
    fs, _ = compute_features(ds, "dimkit-tiny:random", expert=f"blip2:{blip2}", write_report=False)
    one, _ = compute_features(ds, "dimkit-tiny:random", expert=f"blip2:{blip2}", store=tmp_path / "single",
                              cue_store=tmp_path / "single.sqlite", force=True, write_report=False)
    for name in ("mention", "mention_sentence", "image", "cue", "entity", "entity_original"):
        np.testing.assert_allclose(getattr(fs, name), getattr(one, name), rtol=1e-5, atol=1e-6)
