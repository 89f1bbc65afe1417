"""Robust image loading: every bad kind of file is converted or counted, never a crash or a silent blank."""
from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from dimkit import cli, datasets, images
from dimkit.errors import ConfigError, DataError
from dimkit.images import load_image


# ---------------------------------------------------------------------------------------------
# builders: each writes one kind of file into a folder and returns its path


def _rgb_array(w=32, h=24, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")


def _encoded(fmt, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb_array()).save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height and which carries no pixel data (a header-only bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def make_rgb(d: Path) -> Path:
    p = d / "plain.png"
    Image.fromarray(_rgb_array()).save(p)
    return p


def make_gray(d: Path) -> Path:
    p = d / "gray.png"
    Image.fromarray(_rgb_array()[..., 0]).save(p)
    return p


def make_empty(d: Path) -> Path:
    p = d / "empty.jpg"
    p.write_bytes(b"")
    return p


def make_truncated_jpeg(d: Path) -> Path:
    data = _encoded("JPEG", quality=95)
    p = d / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    return p


def make_truncated_png(d: Path) -> Path:
    data = _encoded("PNG")
    p = d / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    return p


def make_truncated_webp(d: Path) -> Path:
    data = _encoded("WEBP")
    p = d / "cut.webp"
    p.write_bytes(data[: len(data) // 2])
    return p


def make_random_bytes(d: Path) -> Path:
    p = d / "noise.jpg"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return p


def make_html(d: Path) -> Path:
    p = d / "error_page.jpg"
    p.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    return p


def make_svg(d: Path) -> Path:
    p = d / "logo.svg"
    p.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>')
    return p


def make_svg_disguised(d: Path) -> Path:
    # Scraped datasets save SVG logos under .png names; the content gives them away.
    p = d / "logo.png"
    p.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"><rect/></svg>')
    return p


def make_animated_gif(d: Path) -> Path:
    p = d / "anim.gif"
    red = Image.new("RGB", (16, 16), (255, 0, 0))
    blue = Image.new("RGB", (16, 16), (0, 0, 255))
    red.save(p, save_all=True, append_images=[blue], duration=100, loop=0)
    return p


def make_palette_transparent(d: Path) -> Path:
    p = d / "pal.png"
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (254 * 3))
    for x in range(8, 16):
        for y in range(16):
            img.putpixel((x, y), 1)  # right half red, left half index 0 = transparent
    img.save(p, transparency=0)
    return p


def make_cmyk(d: Path) -> Path:
    p = d / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # red in CMYK
    return p


def make_16bit(d: Path) -> Path:
    p = d / "deep.png"
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(p)
    return p


def make_rgba(d: Path) -> Path:
    p = d / "rgba.png"
    arr = np.zeros((16, 16, 4), dtype=np.uint8)
    arr[:, 8:] = (0, 200, 0, 255)  # right half opaque green, left half fully transparent
    Image.fromarray(arr, "RGBA").save(p)
    return p


def make_bomb(d: Path) -> Path:
    p = d / "bomb.png"
    p.write_bytes(_png_header_only(100_000, 100_000))  # 10 gigapixels, > 2x Pillow's limit
    return p


def make_soft_bomb(d: Path) -> Path:
    p = d / "soft_bomb.png"
    p.write_bytes(_png_header_only(10_000, 10_000))  # 100 Mpx: Pillow only warns; we refuse
    return p


def make_exif_rotated(d: Path) -> Path:
    p = d / "rotated.jpg"
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # stored left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(arr).save(p, quality=95, exif=exif)
    return p


CASES = {
    # name: (builder, reason, converted)
    "rgb": (make_rgb, None, None),
    "gray": (make_gray, None, "grayscale"),
    "empty": (make_empty, "empty", None),
    "truncated_jpeg": (make_truncated_jpeg, "truncated", None),
    "truncated_png": (make_truncated_png, "truncated", None),
    "truncated_webp": (make_truncated_webp, "truncated", None),
    "random_bytes": (make_random_bytes, "corrupt", None),
    "html_as_jpg": (make_html, "corrupt", None),
    "svg": (make_svg, "svg", None),
    "svg_content": (make_svg_disguised, "svg", None),
    "animated_gif": (make_animated_gif, None, "animated_first_frame+palette"),
    "palette_transparent": (make_palette_transparent, None, "palette+alpha"),
    "cmyk": (make_cmyk, None, "cmyk"),
    "16bit": (make_16bit, None, "16bit"),
    "rgba": (make_rgba, None, "alpha"),
    "bomb": (make_bomb, "too_large", None),
    "soft_bomb": (make_soft_bomb, "too_large", None),
    "exif_rotated": (make_exif_rotated, None, "exif_rotated"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_kind_is_converted_or_recorded(name, tmp_path):
    builder, reason, converted = CASES[name]
    path = builder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = load_image(path)
    assert res.reason == reason, res.detail
    assert res.converted == converted
    assert res.path == path
    if reason is None:
        assert res.ok and res.status == "ok"
        assert isinstance(res.image, Image.Image) and res.image.mode == "RGB"
    else:
        assert not res.ok and res.status == reason
        assert res.image is None
        assert res.detail  # every unusable image says why
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_missing_and_no_image(tmp_path):
    assert load_image(None).reason == "no_image"
    assert load_image(float("nan")).reason == "no_image"
    res = load_image(tmp_path / "nowhere.jpg")
    assert res.reason == "missing" and res.image is None and res.detail == "file not found"
    res = load_image(tmp_path / "mention_images" / "a.jpg")
    assert res.reason == "missing" and "folder not found" in res.detail
    folder = tmp_path / "a_folder.jpg"
    folder.mkdir()
    assert load_image(folder).reason == "unreadable"


def test_max_pixels_is_checked_from_the_header(tmp_path, monkeypatch):
    path = make_rgb(tmp_path)  # 32 x 24 = 768 pixels
    calls = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: calls.append(1) or real_load(self))
    res = load_image(path, max_pixels=500)
    assert res.reason == "too_large" and "768" in res.detail
    assert not calls  # refused before decoding
    assert load_image(path, max_pixels=768).ok


def test_bomb_detail_names_the_size(tmp_path):
    res = load_image(make_soft_bomb(tmp_path))
    assert "10000x10000" in res.detail and "max_pixels" in res.detail
    assert "exceeds limit" in load_image(make_bomb(tmp_path)).detail  # Pillow's hard limit


def test_global_pil_and_warning_state_untouched(tmp_path):
    filters_before = list(warnings.filters)
    max_before = Image.MAX_IMAGE_PIXELS
    for builder, _, _ in CASES.values():
        load_image(builder(tmp_path))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == max_before
    assert list(warnings.filters) == filters_before


def test_16bit_is_scaled_not_clipped(tmp_path):
    gray = np.asarray(load_image(make_16bit(tmp_path)).image)[..., 0]
    # A clipping conversion turns every value above 255 white: almost the whole ramp.
    assert (gray == 255).mean() < 0.05
    assert gray.min() == 0 and gray.max() == 255
    assert 110 < gray.mean() < 145
    assert np.all(np.diff(gray.reshape(-1).astype(int)) >= 0)  # the ramp stays monotone
    # 8-bit data stored in a 16-bit container keeps its values instead of going black.
    small = tmp_path / "small16.png"
    Image.fromarray(np.full((8, 8), 200, dtype=np.uint16)).save(small)
    res = load_image(small)
    assert res.converted == "16bit" and np.asarray(res.image).min() == 200


def test_conversions_keep_the_picture(tmp_path):
    pal = np.asarray(load_image(make_palette_transparent(tmp_path)).image)
    assert tuple(pal[0, 0]) == (255, 255, 255)  # transparent -> white, not black
    assert tuple(pal[0, 15]) == (255, 0, 0)
    rgba = np.asarray(load_image(make_rgba(tmp_path)).image)
    assert tuple(rgba[0, 0]) == (255, 255, 255) and tuple(rgba[0, 15]) == (0, 200, 0)
    cmyk = np.asarray(load_image(make_cmyk(tmp_path)).image).astype(int)
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60 and cmyk[..., 2].mean() < 60
    gif = np.asarray(load_image(make_animated_gif(tmp_path)).image).astype(int)
    assert tuple(gif[8, 8]) == (255, 0, 0)  # the first frame, not the second (blue)


def test_exif_orientation_is_applied(tmp_path):
    img = load_image(make_exif_rotated(tmp_path)).image
    assert img.size == (20, 40)  # stored 40 wide x 20 high, displayed rotated
    arr = np.asarray(img).astype(int)
    top, bottom = arr[5, 10], arr[35, 10]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


# ---------------------------------------------------------------------------------------------
# dataset check


def _toy_dataset(kit_dirs) -> datasets.Dataset:
    root = kit_dirs["data"] / "toy"
    layout = {
        "m1": "img/plain.png", "m2": "img/plain.png", "m3": "img/pal.png", "m4": "img/cut.jpg",
        "m5": "img/missing.jpg", "m6": None, "m7": "img/empty.jpg", "m8": "img/logo.svg",
    }
    mentions = pd.DataFrame({
        "mention_id": list(layout),
        "split": ["train", "train", "train", "dev", "dev", "test", "test", "test"],
        "sentence": [f"sentence {i}" for i in range(8)],
        "mention": ["Jordan"] * 8,
        "image": list(layout.values()),
        "qid": ["Q1", "Q2", "Q1", "Q2", None, "Q1", "Q2", "Q1"],
    })
    entities = pd.DataFrame({"qid": ["Q1", "Q2"], "name": ["Jordan", "Jordan"],
                             "description": ["a player", "a river"],
                             "description_source": ["wikipedia", "wikipedia"], "images": [[], []]})
    datasets.write_prepared(root, mentions, entities, {"layout": "test"})
    img = root / "img"
    img.mkdir()
    make_rgb(img)
    make_palette_transparent(img)
    make_truncated_jpeg(img)
    make_empty(img)
    make_svg(img)
    return datasets.load("toy")


def check(ds, *, progress: bool = False, **settings):
    """The image check of a loaded dataset, through the stage (``images.run``)."""
    return images.run(images.ImagesConfig.for_dataset(ds.name, **settings), dataset=ds, progress=progress)


@pytest.fixture
def counted_loads(monkeypatch):
    """Record every path the image check hands to load_image."""
    calls = []
    real = images.load_image

    def counting(path, **kw):
        calls.append(Path(path).name)
        return real(path, **kw)

    monkeypatch.setattr(images, "load_image", counting)
    return calls


def test_image_check_counts_and_writes(kit_dirs, counted_loads):
    ds = _toy_dataset(kit_dirs)
    filters_before = list(warnings.filters)
    report = check(ds, progress=False, workers=3)
    assert list(warnings.filters) == filters_before  # threads did not leave filters behind
    assert report.counts == {"ok": 3, "no_image": 1, "missing": 1, "empty": 1, "truncated": 1, "svg": 1}
    assert report.file_counts == {"ok": 2, "missing": 1, "empty": 1, "truncated": 1, "svg": 1}
    assert report.conversions == {"palette": 1, "alpha": 1}
    assert report.decoded == 6 and report.reused == 0
    assert sorted(counted_loads) == sorted(["plain.png", "pal.png", "cut.jpg", "missing.jpg",
                                            "empty.jpg", "logo.svg"])  # plain.png once for 2 mentions
    pm = report.per_mention.set_index("mention_id")
    assert pm.loc["m4", "status"] == "truncated" and pm.loc["m6", "status"] == "no_image"
    assert pm.loc["m3", "converted"] == "palette+alpha"
    assert list(report.unusable["mention_id"]) == ["m4", "m5", "m7", "m8"]

    on_disk = pd.read_parquet(ds.root / "mentions.parquet").set_index("mention_id")
    assert on_disk["image_status"].to_dict() == {
        "m1": "ok", "m2": "ok", "m3": "ok", "m4": "truncated", "m5": "missing", "m6": "no_image",
        "m7": "empty", "m8": "svg"}
    assert on_disk.loc["m3", "image_converted"] == "palette+alpha"
    assert on_disk["image_converted"].isna().sum() == 7
    assert list(ds.mentions["image_status"]) == list(on_disk["image_status"])
    datasets.load("toy")  # still a valid prepared dataset

    saved = json.loads((ds.root / "reports" / "images.json").read_text())
    assert saved["counts"] == report.counts and saved["dataset"] == "toy"
    assert saved["files"]["img/cut.jpg"]["status"] == "truncated"
    assert saved == {**report.to_dict(), "files": saved["files"]}
    assert report.report_path == ds.root / "reports" / "images.json"

    text = str(report)
    assert "truncated" in text and "img/cut.jpg" in text and "3 with a usable image" in text
    frame = report.to_frame().set_index("status")
    assert frame.loc["ok", "mentions"] == 3 and frame.loc["ok", "files"] == 2


def test_rerun_reuses_results_and_rechecks_changed_files(kit_dirs, counted_loads):
    ds = _toy_dataset(kit_dirs)
    check(ds, progress=False)
    parquet = ds.root / "mentions.parquet"
    stamp = parquet.stat().st_mtime_ns
    counted_loads.clear()

    again = check(datasets.load("toy"), progress=False)
    assert counted_loads == []  # nothing decoded, not even the missing file re-tried
    assert again.decoded == 0 and again.reused == 6
    assert again.counts["truncated"] == 1
    assert parquet.stat().st_mtime_ns == stamp  # unchanged statuses: no rewrite

    # Repair the truncated file: only it is decoded again, and the status follows.
    make_rgb(ds.root / "img").replace(ds.root / "img" / "cut.jpg")
    Image.fromarray(_rgb_array()).save(ds.root / "img" / "plain.png")  # rewritten: new mtime
    third = check(datasets.load("toy"), progress=False)
    assert sorted(counted_loads) == ["cut.jpg", "plain.png"]
    assert third.counts["ok"] == 4 and "truncated" not in third.counts
    assert pd.read_parquet(parquet).set_index("mention_id").loc["m4", "image_status"] == "ok"

    # A different size limit invalidates every stored verdict.
    counted_loads.clear()
    tiny = check(datasets.load("toy"), progress=False, max_pixels=10)
    assert len(counted_loads) == 6 and tiny.counts["too_large"] == 4


def test_check_without_write_leaves_files_alone(kit_dirs):
    ds = _toy_dataset(kit_dirs)
    report = check(ds, progress=False, write=False, workers=1)
    assert report.counts["ok"] == 3 and report.report_path is None
    assert not (ds.root / "reports").exists()
    assert "image_status" not in pd.read_parquet(ds.root / "mentions.parquet").columns


def test_missing_folder_is_noted(kit_dirs):
    ds = _toy_dataset(kit_dirs)
    ds.mentions.loc[ds.mentions["mention_id"] == "m5", "image"] = "mention_images/x.jpg"
    report = check(ds, progress=False, write=False)
    assert any("mention_images" in note for note in report.notes)


def test_cli_prints_report_and_succeeds(kit_dirs, capsys):
    _toy_dataset(kit_dirs)
    assert cli.main(["images", "toy", "--no-write"]) == 0
    assert "images of toy" in capsys.readouterr().out
    assert not (kit_dirs["data"] / "toy" / "reports").exists()
    assert cli.main(["images", "toy"]) == 0
    out = capsys.readouterr().out
    assert "images of toy" in out and "truncated" in out and "svg" in out
    assert (kit_dirs["data"] / "toy" / "reports" / "images.json").exists()


@pytest.mark.parametrize("name, value, flag", [("max_pixels", 0, "--max-pixels"), ("max_pixels", -5, "--max-pixels"),
                                               ("workers", 0, "--workers")])
def test_nonsense_limits_are_refused_before_anything_is_written(name, value, flag, kit_dirs, counted_loads, capsys):
    ds = _toy_dataset(kit_dirs)
    with pytest.raises(ConfigError) as err:
        check(ds, **{name: value})
    assert str(err.value) == f"{name} must be a positive whole number, got {value}"
    assert cli.main(["images", "toy", flag, str(value)]) == 2
    assert f"{flag} must be a positive whole number, got {value}" in capsys.readouterr().err
    assert counted_loads == []
    assert not (ds.root / "reports").exists()
    assert "image_status" not in pd.read_parquet(ds.root / "mentions.parquet").columns


def test_cli_refuses_max_pixels_zero(kit_dirs, capsys):
    ds = _toy_dataset(kit_dirs)
    assert cli.main(["images", "toy", "--max-pixels", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-pixels" in err and "got 0" in err and "Traceback" not in err
    assert "image_status" not in pd.read_parquet(ds.root / "mentions.parquet").columns
    assert cli.main(["images", "toy", "--workers", "0"]) == 2
    assert "--workers" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# image paths that lead out of the dataset's image folder are never opened


def _edit_images(root: Path, new: dict[str, str]) -> None:
    """Hand-edit ``image`` values in a prepared mentions.parquet."""
    m = pd.read_parquet(root / "mentions.parquet")
    for mid, img in new.items():
        m.loc[m["mention_id"] == mid, "image"] = img
    m.to_parquet(root / "mentions.parquet", index=False)


def _plant_escapes(kit_dirs) -> datasets.Dataset:
    """The toy dataset with three image paths leading to a valid PNG outside it."""
    ds = _toy_dataset(kit_dirs)
    outside = kit_dirs["data"].parent / "secret"
    outside.mkdir()
    make_rgb(outside).rename(outside / "secret.png")  # a real image: opening it would give "ok"
    (ds.root / "img" / "link_out.png").symlink_to(outside / "secret.png")
    _edit_images(ds.root, {"m5": "../../secret/secret.png", "m7": str(outside / "secret.png"),
                           "m8": "img/link_out.png"})
    return datasets.load("toy")


def test_paths_out_of_the_dataset_are_never_opened(kit_dirs, counted_loads):
    ds = _plant_escapes(kit_dirs)
    report = check(ds, progress=False, workers=1)
    assert not [n for n in counted_loads if "secret" in n or "link_out" in n]
    assert "outside_root" in images.REASONS
    pm = report.per_mention.set_index("mention_id")
    assert pm.loc[["m5", "m7", "m8"], "status"].tolist() == ["outside_root"] * 3
    assert "escapes the dataset root" in pm.loc["m5", "detail"]
    assert "is absolute" in pm.loc["m7", "detail"]
    assert "resolves to" in pm.loc["m8", "detail"] and "secret.png" in pm.loc["m8", "detail"]
    assert report.counts["outside_root"] == 3 and report.file_counts["outside_root"] == 3
    assert report.counts["ok"] == 3  # the other images are unaffected
    assert any("outside the dataset's image folder" in n and "not opened" in n for n in report.notes)
    on_disk = pd.read_parquet(ds.root / "mentions.parquet").set_index("mention_id")
    assert on_disk.loc["m8", "image_status"] == "outside_root"
    assert "outside_root" in str(report)
    with pytest.raises(DataError, match="outside the dataset's image folder"):
        ds.image_path("img/link_out.png")
    # a rerun refuses them again (no stored verdict is trusted for them)
    counted_loads.clear()
    again = check(datasets.load("toy"), progress=False)
    assert again.counts["outside_root"] == 3 and counted_loads == []
    # once the link is gone the image is simply missing (not a stale outside_root verdict)
    (ds.root / "img" / "link_out.png").unlink()
    third = check(datasets.load("toy"), progress=False)
    assert third.per_mention.set_index("mention_id").loc["m8", "status"] == "missing"


def test_scan_for_features_and_cues_skips_paths_out_of_the_dataset(kit_dirs, monkeypatch):
    ds = _plant_escapes(kit_dirs)
    hashed = []
    real_sha = images.sha256_file
    monkeypatch.setattr(images, "sha256_file", lambda p: hashed.append(p) or real_sha(p))
    real_load = images.load_image

    def guarded(path, **kw):
        assert "secret" not in str(Path(path).resolve()), f"opened {path}"
        return real_load(path, **kw)

    monkeypatch.setattr(images, "load_image", guarded)
    ds.mentions.loc[ds.mentions["mention_id"] == "m1", "image"] = "img/plain.png"
    ds.mentions["images"] = [["img/link_out.png"] if mid == "m6" else [] for mid in ds.mentions["mention_id"]]
    scan = images.scan_images(ds, progress=False, flag=False)
    assert scan.files["img/link_out.png"].status == "outside_root"
    assert scan.files["img/link_out.png"].path is None
    assert scan.per_mention.set_index("mention_id").loc["m5", "status"] == "outside_root"
    assert not [p for p in hashed if "secret" in str(p.resolve())]


def test_images_through_a_chain_of_links_stay_usable(kit_dirs):
    ds = _toy_dataset(kit_dirs)
    raw = kit_dirs["data"].parent / "raw"
    (ds.root / "img").rename(raw)
    (ds.root / "img").symlink_to(raw, target_is_directory=True)  # as prepare links images/
    plus = kit_dirs["data"] / "toy+"
    plus.mkdir()
    for f in ("mentions.parquet", "entities.parquet", "meta.json"):
        (plus / f).write_bytes((ds.root / f).read_bytes())
    (plus / "img").symlink_to("../toy/img")  # as augment links the source's images
    report = check(datasets.load("toy+"), progress=False, write=False)
    assert report.counts["ok"] == 3 and "outside_root" not in report.counts


# ---------------------------------------------------------------------------------------------
# the report names the real cause when the raw image folder was moved after prepare


def test_moved_raw_image_folder_is_named_as_the_cause(tmp_path, kit_dirs):
    import fixtures_prepare as fx
    from dimkit import prepare

    src = fx.build_dim_wiki(tmp_path / "dim")
    root = prepare.run(prepare.PrepareConfig(src=src, dataset="wl")).root
    old = (src / "ImgData").resolve()
    ds = datasets.load("wl")
    # while the link works, a subfolder missing from the paths gets the folder-name hint
    ds.mentions.loc[0, "image"] = "images/mention_image/x.jpg"
    report = check(ds, progress=False, write=False)
    assert any("check the folder name" in n and "mention_image" in n for n in report.notes)
    assert report.to_dict()["images_root"] == {"path": str(root / "images"), "link_target": str(old),
                                               "exists": True}

    (src / "ImgData").rename(tmp_path / "moved")
    report = check(datasets.load("wl"), progress=False)
    assert report.counts == {"missing": 11}
    assert (f"images/ is a link to {old}, which no longer exists: the raw image folder was moved or "
            f"deleted; prepare again with `dimkit prepare {src} --name wl --images NEW_FOLDER` "
            "(or re-point the link)") in report.notes
    assert not any("check the folder name" in n for n in report.notes)
    saved = json.loads((root / "reports" / "images.json").read_text())
    assert saved["images_root"] == {"path": str(root / "images"), "link_target": str(old),
                                    "exists": False}


def test_missing_copied_image_folder_is_named_as_the_cause(tmp_path, kit_dirs):
    import shutil

    import fixtures_prepare as fx
    from dimkit import prepare

    src = fx.build_dim_wiki(tmp_path / "dim")
    root = prepare.run(prepare.PrepareConfig(src=src, dataset="wc", copy_images=True)).root
    shutil.rmtree(root / "images")
    report = check(datasets.load("wc"), progress=False, write=False)
    assert report.to_dict()["images_root"] == {"path": str(root / "images"), "link_target": None,
                                               "exists": False}
    assert any(n.startswith(f"{root / 'images'} does not exist") and "--images" in n
               for n in report.notes)
    assert not any("check the folder name" in n for n in report.notes)


def test_figures_show_a_path_out_of_the_dataset_as_unusable_instead_of_failing(kit_dirs):
    from dimkit import datasets
    from dimkit.images import load_dataset_image
    from dimkit.plots import mention_grid

    ds = datasets.load("sample")
    ds.mentions.loc[0, "image"] = "../../etc/passwd"
    res = load_dataset_image(ds, "../../etc/passwd")
    assert res.image is None and res.status == "outside_root" and res.path is None
    fig = mention_grid(ds, ds.mentions.head(2))
    assert fig is not None
