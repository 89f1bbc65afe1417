"""Shared test set-up: every test runs offline, quiet, and with its own data/cache/runs folders."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def kit_dirs(tmp_path, monkeypatch):
    """Point DIMKIT_DATA / DIMKIT_CACHE / DIMKIT_RUNS / DIMKIT_FIGURES at a fresh tmp folder."""
    dirs = {}
    for var, sub in (("DIMKIT_DATA", "data"), ("DIMKIT_CACHE", "cache"), ("DIMKIT_RUNS", "runs"),
                     ("DIMKIT_FIGURES", "figures")):
        d = tmp_path / sub
        d.mkdir()
        monkeypatch.setenv(var, str(d))
        dirs[sub] = d
    return dirs


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (tiny models: more threads only add contention on the
    shared 2-core machines). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
