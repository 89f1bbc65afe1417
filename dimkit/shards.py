"""Splitting cue and feature extraction across processes and GPUs.

Any number of processes can fill one cue store and one feature store at once; each takes the rows
whose content hash falls into its shard, so shards never overlap::

    accelerate launch --multi_gpu --num_processes 4 -m dimkit.cli cues wiki+      # or torchrun --nproc_per_node 4
    accelerate launch --multi_gpu --num_processes 4 -m dimkit.cli features wiki+

Under a launcher (``RANK``/``WORLD_SIZE`` set) ``--shard auto``, the default, takes this process's
share and its own GPU (``LOCAL_RANK``). With the launcher's rendezvous (``MASTER_ADDR``/``MASTER_PORT``)
the processes wait for each other and rank 0 assembles the dataset's result, computing only what is
left; without one (``--shard i/n`` by hand), run once more without ``--shard`` to assemble. (On a
machine without GPUs, ``accelerate launch --multi_gpu --num_processes 2`` starts two CPU processes.)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from .errors import ConfigError, DimkitError, option

#: How long finished shards wait for the slowest one before giving up (hours; env DIMKIT_SHARD_WAIT_HOURS).
DEFAULT_WAIT_HOURS = 72.0


@dataclass(frozen=True)
class Shard:
    """This process's share: index ``i`` of ``n``; ``launched`` when a launcher set it up."""

    i: int
    n: int
    launched: bool = False

    def __str__(self) -> str:
        return f"{self.i}/{self.n}"


def parse_shard(shard: str | tuple[int, int] | Shard | None) -> Shard | None:
    """``"i/n"``, ``(i, n)`` or ``"auto"`` (RANK/WORLD_SIZE of accelerate or torchrun; None alone)."""
    if shard is None or isinstance(shard, Shard):
        return shard
    if shard == "auto":
        try:
            n = int(os.environ.get("WORLD_SIZE", "1"))
            i = int(os.environ.get("RANK", "0"))
        except ValueError:
            raise DimkitError(f"RANK/WORLD_SIZE must be integers, got RANK={os.environ.get('RANK')!r} "
                              f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}") from None
        if n <= 1:
            return None
        if not 0 <= i < n:
            raise DimkitError(f"RANK={i} out of range for WORLD_SIZE={n}")
        return Shard(i, n, launched=True)
    if isinstance(shard, str):
        try:
            i, n = (int(x) for x in shard.split("/"))
        except ValueError:
            raise ConfigError(f"{option('shard', '--shard')} must be 'auto' or look like 0/2, got {shard!r}") from None
    else:
        i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard index {i} out of range for {n} shards")
    return Shard(i, n) if n > 1 else None


def in_shard(content_hash: str, shard: Shard | None) -> bool:
    """Whether a content hash falls into this process's shard (hash-based, so shards never overlap)."""
    return shard is None or int(content_hash[:8], 16) % shard.n == shard.i


def shard_device(device: str) -> str:
    """Under ``accelerate launch``/``torchrun`` each process takes its own GPU (``LOCAL_RANK``)."""
    if device != "auto" or "LOCAL_RANK" not in os.environ:
        return device
    from .env import pick_device

    return f"cuda:{int(os.environ['LOCAL_RANK'])}" if pick_device("auto") == "cuda" else device


def can_wait(shard: Shard | None) -> bool:
    """Whether the shards can meet at the end (a launcher's rendezvous is available)."""
    return bool(shard and shard.launched and os.environ.get("MASTER_ADDR") and os.environ.get("MASTER_PORT"))


def wait_for_all(shard: Shard) -> None:
    """Block until every shard of the launch reaches this point (a gloo barrier over the launcher's
    rendezvous; CPU only, so it needs no GPU communication library)."""
    import torch.distributed as dist

    hours = float(os.environ.get("DIMKIT_SHARD_WAIT_HOURS", DEFAULT_WAIT_HOURS))
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", rank=shard.i, world_size=shard.n, timeout=timedelta(hours=hours))
    try:
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()


def help_text(what: str) -> str:
    """The help of the ``shard`` setting of ``dimkit cues`` / ``dimkit features`` (``what``: the rows it splits)."""
    return (f"i/n: only this process's share of the {what}; auto: the launcher's RANK/WORLD_SIZE under "
            "accelerate launch or torchrun, else everything")


def check(setting: str | None) -> None:
    """Refuse a ``shard`` setting that is neither None, ``auto`` nor ``i/n`` (without reading the
    launcher's variables)."""
    if setting not in (None, "auto"):
        parse_shard(setting)


def run_then_assemble(shard_arg, run, show):
    """The launch flow of ``cues`` and ``features``; returns the result to report.

    ``run(shard, assembling=False)`` computes this process's share (or everything, unsharded). Under
    a launcher with a rendezvous every shard then waits for the others, and rank 0 shows its share's
    result (``show``) and returns ``run(None, assembling=True)``, which only assembles and writes the
    dataset's report (it must not force a recompute). A shard that does not assemble returns its
    share's result with ``next_step`` saying what comes next.
    """
    shard = parse_shard(shard_arg)
    result = run(shard, False)
    if shard is None:
        return result
    if not can_wait(shard):
        again = option("run again with shard=None", "run the same command without --shard")
        result.next_step = (f"shard {shard} done; once every shard has finished, {again} to assemble "
                            "(it computes only what is left)")
        return result
    if shard.i == 0:
        show(result)
    print(f"shard {shard} done; waiting for the other shards", flush=True)
    wait_for_all(shard)
    if shard.i == 0:
        print(f"all {shard.n} shards done; assembling", flush=True)
        return run(None, True)
    result.next_step = "all shards done; rank 0 assembles"
    return result
