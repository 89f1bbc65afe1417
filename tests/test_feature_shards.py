"""Two processes fill one cue store and one feature store at once (``--shard auto`` under
accelerate/torchrun sets RANK and WORLD_SIZE); a final unsharded run computes nothing new."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import tinymedia
from dimkit import features

pytestmark = pytest.mark.slow


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
            procs.append(subprocess.Popen(base + stage + ["--shard", "auto"], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=300)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert all("shard" in o for o in outs)
    # both shards wrote their own part files into the same store
    store = features.FeatureStore("dimkit-tiny:random")
    assert len({p.name.split("-")[2] for p in store.parts()}) == 2   # two writer pids
    fs, rep = features.compute_features(ds, "dimkit-tiny:random", expert=f"replay:{cue_file}", progress=False)
    assert (rep.texts["done"], rep.images["done"], rep.model_loaded) == (0, 0, False)
    assert rep.cues["with_cue"] == 4 and fs.image_ok.sum() == 4
    single, _ = features.compute_features(ds, "dimkit-tiny:random", expert=f"replay:{cue_file}", progress=False,
                                          store_root=tmp_path / "single", force=True)
    for name in ("mention", "mention_sentence", "image", "cue", "entity", "entity_original"):
        np.testing.assert_allclose(getattr(fs, name), getattr(single, name), rtol=1e-5, atol=1e-6)
