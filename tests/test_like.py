"""Synthetic datasets shaped like the real ones (dimkit_dev.like), for the rehearsal."""
from __future__ import annotations

import filecmp
import json

from dimkit import datasets, images, prepare
from dimkit_dev import like


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_same_arguments_same_bytes_and_the_real_shape_scaled(tmp_path):
    a = like.build_like("wikimel", tmp_path / "a", scale=0.004, seed=3, workers=2)
    b = like.build_like("wikimel", tmp_path / "b", scale=0.004, seed=3, workers=1)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    _, mismatch, errors = filecmp.cmpfiles(tmp_path / "a", tmp_path / "b", _files(tmp_path / "a"), shallow=False)
    assert not mismatch and not errors
    shape = like.SHAPES["wikimel"]
    assert a.mentions == {k: -(-shape[k] * 4 // 1000) for k in ("train", "dev", "test")}
    assert a.entities == -(-shape["kb"] * 4 // 1000) and a.mentions == b.mentions
    brief = json.loads((tmp_path / "a" / "wikipedia" / "brief.json").read_text())
    words = [len(v.split("[SEP]. ")[1].split()) for v in brief.values()]
    assert 12 <= min(words) and max(words) <= 90  # Wikipedia-brief lengths
    names = [v.split(" [SEP]")[0] for v in brief.values()]
    assert len(set(names)) < len(names)  # namesakes: the ambiguity MEL is about


def test_prepare_reads_it_and_the_image_check_finds_the_broken_share(tmp_path, kit_dirs):
    report = like.build_like("richpediamel", tmp_path / "src", scale=0.002, seed=0, workers=2)
    prepare.run(prepare.PrepareConfig(src=tmp_path / "src", dataset="rich-like"))
    ds = datasets.load("rich-like")
    assert len(ds.entities) == report.entities and len(ds.mentions) == sum(report.mentions.values())
    check = images.run(images.ImagesConfig(dataset="rich-like"), progress=False)
    broken = sum(v for k, v in report.images.items() if k in like.BROKEN)
    assert check.counts.get("ok", 0) == len(ds.mentions) - broken
    assert {"missing", "empty", "corrupt", "truncated"} >= set(check.counts) - {"ok"}
