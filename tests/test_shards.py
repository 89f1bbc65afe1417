"""Shard arithmetic and the launch flow (the real two-process launches are in test_feature_shards)."""
from __future__ import annotations

import hashlib

import pytest

from dimkit import shards
from dimkit.errors import DimkitError


@pytest.fixture()
def no_launcher(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    return monkeypatch


def test_parse_shard_by_hand_and_from_the_launcher(no_launcher):
    assert shards.parse_shard(None) is None and shards.parse_shard("auto") is None   # not launched
    assert shards.parse_shard("1/3") == shards.Shard(1, 3) and shards.parse_shard((0, 1)) is None
    for bad in ("3/3", "x", "1-2", "0/0"):
        with pytest.raises(DimkitError, match="shard"):
            shards.parse_shard(bad)
    no_launcher.setenv("RANK", "1")
    no_launcher.setenv("WORLD_SIZE", "2")
    s = shards.parse_shard("auto")
    assert (s.i, s.n, s.launched, str(s)) == (1, 2, True, "1/2")
    assert not shards.can_wait(s)                       # RANK/WORLD_SIZE alone: no rendezvous
    no_launcher.setenv("MASTER_ADDR", "127.0.0.1")
    no_launcher.setenv("MASTER_PORT", "29500")
    assert shards.can_wait(s) and not shards.can_wait(shards.Shard(1, 2))   # by hand: never waits
    no_launcher.setenv("RANK", "5")
    with pytest.raises(DimkitError, match="RANK=5"):
        shards.parse_shard("auto")


def test_shards_partition_the_hashes():
    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(300)]
    parts = [[h for h in hashes if shards.in_shard(h, shards.Shard(i, 3))] for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(hashes)               # every row once
    assert all(60 < len(p) < 140 for p in parts)                  # roughly even
    assert all(shards.in_shard(h, None) for h in hashes)


def test_run_then_assemble(no_launcher, capsys):
    from dataclasses import dataclass

    @dataclass
    class Share:
        shard: object
        assembling: bool
        next_step: str = ""

    calls = []

    def run(shard, assembling):
        calls.append((shard, assembling))
        return Share(shard, assembling)

    shown = []
    got = shards.run_then_assemble("auto", run, shown.append)     # no launcher: one plain run
    assert calls == [(None, False)] and got == Share(None, False) and not shown
    calls.clear()
    got = shards.run_then_assemble("0/2", run, shown.append)      # by hand: tells how to assemble
    assert calls == [(shards.Shard(0, 2), False)] and not shown
    assert got.next_step.startswith("shard 0/2 done") and "run again with shard=None to assemble" in got.next_step

    waited = []
    no_launcher.setattr(shards, "wait_for_all", waited.append)
    for k, v in {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        no_launcher.setenv(k, v)
    for rank in (1, 0):
        calls.clear()
        no_launcher.setenv("RANK", str(rank))
        got = shards.run_then_assemble("auto", run, shown.append)
        share = shards.Shard(rank, 2, launched=True)
        assert waited[-1] == share
        assert calls == ([(share, False)] if rank else [(share, False), (None, True)])  # rank 0 assembles
        if rank:
            assert got == Share(share, False, "all shards done; rank 0 assembles") and not shown
        else:
            assert got == Share(None, True) and shown == [Share(share, False)]    # its share shown first
    out = capsys.readouterr().out
    assert "shard 1/2 done; waiting for the other shards" in out and "all 2 shards done; assembling" in out


def test_shard_settings_are_checked_without_a_launcher(no_launcher):
    from dimkit import cues
    from dimkit.errors import ConfigError

    no_launcher.setenv("RANK", "5")                      # read only when a run starts
    assert cues.CuesConfig(dataset="tiny").shard == "auto"
    cues.CuesConfig(dataset="tiny").validate()
    with pytest.raises(ConfigError, match="shard must be 'auto' or look like 0/2, got '1-2'"):
        cues.CuesConfig(dataset="tiny", shard="1-2").validate()
