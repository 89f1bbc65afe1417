"""Linking new mentions with a trained run, batch files, refusals, and the error analysis (dimkit.link,
dimkit.analysis). One short run is trained on the sample for the whole module."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dimkit import analysis, cli, datasets, runs, train
from dimkit_dev import synthetic
from dimkit.errors import ConfigError, DataError, DimkitError
from dimkit.link import Linker, link, link_file, read_run


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """sample+ prepared, its features stored, and a paper run of 6 epochs, in scratch folders."""
    root = tmp_path_factory.mktemp("kit")
    mp = pytest.MonkeyPatch()
    for var, sub in (("DIMKIT_DATA", "data"), ("DIMKIT_CACHE", "cache"), ("DIMKIT_RUNS", "runs"),
                     ("DIMKIT_FIGURES", "figures")):
        (root / sub).mkdir()
        mp.setenv(var, str(root / sub))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: threads only add contention on the shared cores
    try:
        from dimkit import augment
        from dimkit.features import load_features

        augment.augment("sample", model=augment.SAMPLE_ORACLE, replay=True, progress=False)
        ds = datasets.load("sample+")
        fs = load_features(ds, progress=False)
        result = train.run(train.TrainConfig.for_dataset("sample+", num_epochs=6), dataset=ds, features=fs, progress=False)
        ds = datasets.load("sample+")  # with the image_status column the feature run wrote
        yield {"root": root, "ds": ds, "fs": fs, "run": result.run_dir, "result": result,
               "pred": pd.read_parquet(result.run_dir / "predictions.parquet")}
    finally:
        torch.set_num_threads(threads)
        mp.undo()


def _test_mentions(ds):
    t = ds.split("test")
    return t[t["image_status"] == "ok"] if "image_status" in t else t


def test_the_run_records_its_feature_models(sample_run):
    info = read_run(sample_run["run"])
    assert info.clip_spec == "sample" and info.feature_model == sample_run["fs"].model_id
    assert info.cue_expert_spec == "sample-oracle" and info.cue_expert == "sample-oracle"
    assert info.precision == "fp32" and info.entity_column == "description"


def test_linking_a_sample_mention_returns_its_gold_as_training_ranked_it(sample_run):
    ds, pred, run = sample_run["ds"], sample_run["pred"].set_index("mention_id"), sample_run["run"]
    rows = _test_mentions(ds).head(12)
    found = 0
    for _, r in rows.iterrows():
        df = link(r["sentence"], r["mention"], ds.image_path(r["image"]), model=run, k=10)
        assert list(df.columns) == ["qid", "name", "description", "score"] and len(df) == 10
        assert (np.diff(df["score"].to_numpy()) <= 1e-6).all(), "best first"
        p = pred.loc[r["mention_id"]]
        # the same model on the same stored features: exactly the ranking training wrote
        assert list(df["qid"][:5]) == list(p["top5"])
        if p["rank_kb"] <= 10:
            assert r["qid"] in set(df["qid"]), "the gold is in the top k whenever training ranked it there"
            found += 1
        assert df.attrs["image_status"] == "ok" and df.attrs["cue_status"] == "ok" and df.attrs["cue"]
        assert df.attrs["computed"] == {}, "everything was stored: nothing is recomputed"
        assert abs(sum(df.attrs["attention"].values()) - 1) < 1e-3
        assert "not comparable" in df.attrs["note"]
    assert found >= 6
    by_name = link(rows.iloc[0]["sentence"], rows.iloc[0]["mention"], ds.image_path(rows.iloc[0]["image"]),
                   model=run.name, k=3)
    assert len(by_name) == 3


def test_a_new_image_and_sentence_are_encoded_with_the_runs_clip(sample_run, tmp_path):
    ds, run = sample_run["ds"], sample_run["run"]
    r = _test_mentions(ds).iloc[0]
    new = tmp_path / "holiday.jpg"
    Image.open(ds.image_path(r["image"])).convert("RGB").save(new, quality=90)  # new bytes, same picture
    linker = Linker(run)
    df = linker.link(f"A postcard of {r['mention']} from my holiday.", r["mention"], new, k=5)
    assert df.attrs["computed"]["image vectors"] == 1 and df.attrs["computed"]["text vectors"] == 1
    # the run's expert replays the sample's stored cues: it knows nothing about a file outside the dataset
    assert df.attrs["cue"] is None and df.attrs["cue_status"] == "not_in_replay"
    assert len(df) == 5 and df["qid"].isin(ds.entities["qid"]).all()
    # a PIL image is keyed by its pixels; decoded from the same file it gives the same ranking
    pil = linker.link(f"A postcard of {r['mention']} from my holiday.", r["mention"], Image.open(new), k=5)
    assert pil.attrs["computed"] == {"image vectors": 1} and list(pil["qid"]) == list(df["qid"])


def test_an_unusable_image_is_refused_naming_the_file_unless_allowed(sample_run, tmp_path):
    ds, run = sample_run["ds"], sample_run["run"]
    r = _test_mentions(ds).iloc[0]
    missing = tmp_path / "nowhere.png"
    with pytest.raises(DataError, match="nowhere.png.*image unusable \\(missing"):
        link(r["sentence"], r["mention"], missing, model=run)
    df = link(r["sentence"], r["mention"], missing, model=run, allow_unusable_image=True)
    assert df.attrs["image_status"] == "missing" and df.attrs["cue_status"] == "image_missing"
    assert df.attrs["attention"]["image"] == 0.0 and df.attrs["attention"]["cue"] == 0.0
    with pytest.raises(DataError, match="mention"):
        link(r["sentence"], "  ", ds.image_path(r["image"]), model=run)


def test_the_batch_command_skips_and_reports_bad_lines(sample_run, tmp_path, capsys):
    ds, run = sample_run["ds"], sample_run["run"]
    rows = _test_mentions(ds).head(2)
    folder = tmp_path / "batch"
    (folder / "img").mkdir(parents=True)
    shutil.copy(ds.image_path(rows.iloc[0]["image"]), folder / "img" / "a.png")
    (folder / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    lines = [
        {"sentence": rows.iloc[0]["sentence"], "mention": rows.iloc[0]["mention"], "image": "img/a.png"},
        {"sentence": "A broken picture of Dunvarra.", "mention": "Dunvarra", "image": "img/broken.png"},
        {"sentence": "No mention field here.", "image": "img/a.png"},
        "{not json",
        {"id": "x5", "sentence": rows.iloc[1]["sentence"], "mention": rows.iloc[1]["mention"],
         "image": str(ds.image_path(rows.iloc[1]["image"]))},
    ]
    src = folder / "in.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "out" / "linked.jsonl"
    rc = cli.main(["link", str(run), "--input", str(src), "--output", str(out), "--k", "4"])
    assert rc == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["line"] for g in got] == [1, 5] and got[1]["id"] == "x5"
    assert all(len(g["entities"]) == 4 and {"qid", "name", "description", "score"} <= set(g["entities"][0])
               for g in got)
    assert got[0]["entities"][0]["qid"] == link(rows.iloc[0]["sentence"], rows.iloc[0]["mention"],
                                                ds.image_path(rows.iloc[0]["image"]), model=run, k=1)["qid"].iloc[0]
    skipped = [json.loads(x) for x in (out.parent / "linked.skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["field"]) for s in skipped] == [(2, "image"), (3, "mention"), (4, None)]
    assert skipped[0]["reason"].startswith("image_") and "broken.png" in skipped[0]["detail"]
    assert [s["reason"] for s in skipped[1:]] == ["missing_field", "bad_json"]
    printed = capsys.readouterr().out
    assert "linked 2 of 5 lines" in printed and "skipped 3" in printed and "line 3: missing_field (mention)" in printed
    # the API returns the same report; allowing unusable images links the broken line too
    rep = link_file(run, src, tmp_path / "again.jsonl", k=2, allow_unusable_images=True, progress=False)
    assert rep.linked == 3 and rep.reasons() == {"missing_field": 1, "bad_json": 1}
    # an expert object, as Linker takes, works here too; a Linker together with one is ambiguous
    from dimkit.experts import make_expert

    expert = make_expert(read_run(run).cue_expert_spec)
    rep = link_file(run, src, tmp_path / "third.jsonl", k=2, expert=expert, progress=False)
    third = [json.loads(x) for x in (tmp_path / "third.jsonl").read_text().splitlines()]
    assert rep.linked == 2 and [t["entities"] for t in third] == [g["entities"][:2] for g in got]
    with pytest.raises(ConfigError, match="build the Linker with the expert"):
        link_file(Linker(run), src, tmp_path / "fourth.jsonl", expert=expert, progress=False)


def test_a_run_whose_feature_model_is_missing_is_refused_clearly(sample_run, monkeypatch, tmp_path):
    clip_module = sys.modules["dimkit.clip"]
    monkeypatch.setattr(clip_module, "SAMPLE_CLIP_DIR", tmp_path / "deleted-clip")
    with pytest.raises(DimkitError, match=r"trained on features of CLIP dimkit-sample-clip.*not available here"):
        Linker(sample_run["run"])
    monkeypatch.undo()
    # weights that changed under the same spec are refused too
    moved = tmp_path / "copied-run"
    shutil.copytree(sample_run["run"], moved)
    for name in ("features.json", "metrics.json"):
        d = json.loads((moved / name).read_text())
        d["feature_model"] = "dimkit-sample-clip@1:00000000"
        (moved / name).write_text(json.dumps(d))
    with pytest.raises(DimkitError, match="its weights changed"):
        Linker(moved)
    (moved / "features.json").unlink()
    with pytest.raises(DimkitError, match="features.json"):
        Linker(moved)


def test_a_run_trained_on_features_handed_in_memory_cannot_be_linked(sample_run):
    ds, fs = synthetic.make_problem(n_mentions=120, n_groups=6, group_size=2, dim=16, seed=1)
    cfg = train.TrainConfig.for_dataset("synthetic", hidden=16, heads=4, num_epochs=1, eval_steps=0, batch_size=32,
                           warmup_steps=1, patience=0, protocols="kb", select_protocol="kb", negatives="random")
    result = train.run(cfg, dataset=ds, features=fs, progress=False)
    assert json.loads((result.run_dir / "features.json").read_text())["clip_spec"] is None
    with pytest.raises(DimkitError, match="does not say how to load that model"):
        Linker(result.run_dir)


def test_error_analysis_agrees_with_training_and_classifies_every_failure(sample_run):
    a = analysis.analyse(sample_run["run"])
    assert analysis.agreement_with_training(a) == 1.0
    t = a.table
    assert len(t) == int(sample_run["result"].counts["test"])
    assert set(t.loc[~t["correct"], "error_kind"]) <= set(analysis.ERROR_KINDS)
    alike = t[t["error_kind"] == "name-alike entity chosen"]
    assert (alike["gold_name"] == alike["pred_name"]).all() and (alike["gold_qid"] != alike["pred_qid"]).all()
    assert (t.loc[t["error_kind"] == "image unusable", "image_ok"] == False).all()  # noqa: E712
    s = analysis.confusion_summary(a).set_index("error kind")
    assert s.loc["all failures", "failures"] == (~t["correct"]).sum() == s["failures"].iloc[:-1].sum()
    assert abs(t["correct"].mean() - sample_run["result"].metrics["test"]["dim"]["H@1"]) < 1e-9
    w = a.worst(3)
    assert (np.diff(w["margin"].to_numpy()) <= 0).all() and not w["correct"].any()
    assert {"gold description", "predicted description", "cue", "attention"} <= set(analysis.failure_table(a, 3))
    assert np.allclose(t[[f"attention {k}" for k in a.attention_keys]].sum(axis=1), 1.0, atol=1e-4)


def test_comparing_a_run_with_its_text_only_ablation(sample_run):
    text = runs.ensure("sample+", "paper", "text_only", quick_epochs=2)
    assert runs.latest("sample+", "paper", "text_only") == text
    cfg = analysis.AnalysisConfig.for_dataset("sample+", quick_epochs=2)
    assert cfg.other_run() == text and cfg.main_run() == sample_run["run"]  # found, not trained again
    a = analysis.analyse(sample_run["run"])
    b = analysis.analyse(text)
    assert not b.attention_keys or b.attention_keys == ["mention_sentence"]
    c = analysis.compare(a, b)
    merged = a.table.merge(b.table, on="mention_id")
    assert len(c.table) == int((merged["pred_qid_x"] != merged["pred_qid_y"]).sum()) > 0
    summary = c.summary().set_index("outcome")["mentions"]
    assert summary.sum() == len(a.table)
    assert summary["only paper right"] == int((merged["correct_x"] & ~merged["correct_y"]).sum())


def test_two_runs_of_one_label_are_told_apart_by_their_run_names(sample_run):
    import dataclasses

    a = analysis.analyse(sample_run["run"])
    t = a.table.copy()
    flip = t.index[:5]
    t.loc[flip, "pred_qid"] = t.loc[flip, "gold_qid"].where(~t.loc[flip, "correct"], "Q-other")
    t.loc[flip, "correct"] = ~t.loc[flip, "correct"]
    b = dataclasses.replace(a, run_name="sample+-paper-full-s2-other", table=t)  # another seed of the same variant
    c = analysis.compare(a, b)
    assert c.labels == (a.run_name, b.run_name) and len(c.table) == 5
    assert (c.table[f"{a.run_name} right"] != c.table[f"{b.run_name} right"]).all()
    assert f"only {b.run_name} right" in set(c.summary()["outcome"])
    with pytest.raises(ConfigError, match="compared with itself"):
        analysis.compare(a, a)


def test_the_errors_stage_writes_what_training_measured_and_the_text_only_run_beside_it(sample_run, capsys):
    run = sample_run["run"]
    text = runs.ensure("sample+", "paper", "text_only", quick_epochs=2)
    cfg = analysis.AnalysisConfig.for_dataset("sample+", run=str(run), n_worst=3)
    rep = analysis.run(cfg, progress=False)
    out = run / "errors" / "test-dim"  # the default folder
    assert rep.files == [out / f for f in ("mentions.csv", "error_kinds.csv", "disagreements.csv", "summary.json")]
    # checked against what training wrote, not against the analysis code itself
    mine = pd.read_csv(out / "mentions.csv", dtype={"mention_id": str}).set_index("mention_id")
    pred = sample_run["pred"].query("split == 'test'").set_index("mention_id")
    assert sorted(mine.index) == sorted(pred.index)
    assert (mine["rank"] == pred.loc[mine.index, "rank_dim"]).all()
    kinds = pd.read_csv(out / "error_kinds.csv").set_index("error kind")
    assert kinds.loc["all failures", "failures"] == int((pred["rank_dim"] > 1).sum())
    other = pd.read_parquet(text / "predictions.parquet").query("split == 'test'").set_index("mention_id")
    right, right_text = pred["rank_dim"] == 1, other.loc[pred.index, "rank_dim"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hits_at_1"] == pytest.approx(sample_run["result"].metrics["test"]["dim"]["H@1"])
    assert summary["agreement_with_training"] == 1.0 and summary["compared_with"]["run"] == text.name
    outcomes = summary["compared_with"]["outcomes"]
    assert outcomes["only paper right"] == int((right & ~right_text).sum())
    assert outcomes["only paper (text_only) right"] == int((~right & right_text).sum())
    assert sum(outcomes.values()) == len(pred)
    dis = pd.read_csv(out / "disagreements.csv", dtype={"mention_id": str})
    assert set(dis["mention_id"]) >= set(pred.index[right != right_text])  # one right, one wrong: they differ
    printed = rep.summary()
    assert "worst 3 failures" in printed and "paper vs paper (text_only)" in printed
    # without a comparison, the one written before does not stay to be read as this run's
    assert cli.main(["errors", "sample+", "--run", str(run), "--compare-ablation", "none"]) == 0
    assert "compared_with" not in json.loads((out / "summary.json").read_text())
    assert not (out / "disagreements.csv").exists()
    assert "not comparable to the paper" in capsys.readouterr().out  # the sample says what its numbers are


def test_the_errors_command_refuses_a_run_of_another_dataset_or_an_unprepared_one(sample_run, capsys):
    assert cli.main(["errors", "sample", "--run", str(sample_run["run"])]) == 2
    assert "was trained on sample+, not on sample" in capsys.readouterr().err
    assert cli.main(["errors", "wiki+"]) == 2  # refused before any run is looked for or trained
    err = capsys.readouterr().err
    assert "'wikimel+' is not prepared" in err and not list(sample_run["root"].joinpath("runs").glob("wikimel+*"))
    # a run compared with itself, or with a run of another dataset, is refused before anything is computed
    assert cli.main(["errors", "sample+", "--run", str(sample_run["run"]), "--compare-run", str(sample_run["run"])]) == 2
    assert "cannot be set beside" in capsys.readouterr().err


def _one_line_input(ds, folder, image=True):
    """A batch file of one test mention of the sample (its image by absolute path unless ``image`` is False)."""
    r = _test_mentions(ds).iloc[0]
    rec = {"sentence": r["sentence"], "mention": r["mention"]}
    if image:
        rec["image"] = str(ds.image_path(r["image"]))
    src = folder / "in.jsonl"
    src.write_text(json.dumps(rec) + "\n")
    return src


def test_the_link_command_refuses_a_device_it_cannot_use(sample_run, tmp_path, capsys, monkeypatch):
    run = sample_run["run"]
    src, out = _one_line_input(sample_run["ds"], tmp_path), tmp_path / "out.jsonl"
    assert cli.main(["link", str(run), "--input", str(src), "--output", str(out), "--device", "banana"]) == 2
    err = capsys.readouterr().err
    assert "dimkit link: error: unknown device 'banana': choose one of auto, cpu, cuda, cuda:N, mps" in err
    assert "Traceback" not in err and not out.exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["link", str(run), "--input", str(src), "--output", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU is visible to torch here (torch.cuda.is_available() is False); use --device cpu or auto" in err
    assert "Traceback" not in err and not out.exists()
    with pytest.raises(ConfigError, match="'cuda:1'"):
        link("A sentence.", "Dunvarra", None, model=run, device="cuda:1")


def test_an_input_file_that_is_not_utf8_is_refused_naming_the_line(sample_run, tmp_path, capsys):
    ds, run = sample_run["ds"], sample_run["run"]
    r = _test_mentions(ds).iloc[0]
    first = json.dumps({"sentence": r["sentence"], "mention": r["mention"], "image": str(ds.image_path(r["image"]))})
    second = json.dumps({"sentence": "Un café à Dunvarra.", "mention": r["mention"],
                         "image": str(ds.image_path(r["image"]))}, ensure_ascii=False)
    src, out = tmp_path / "latin1.jsonl", tmp_path / "out.jsonl"
    src.write_bytes((first + "\n" + second + "\n").encode("latin-1"))
    at = len(first) + 1 + second.index("é")
    with pytest.raises(DataError) as err:
        link_file(run, src, out, progress=False)
    assert err.value.file == str(src) and f"line 2 (byte offset {at}) is not UTF-8" in str(err.value)
    assert not out.exists()
    assert cli.main(["link", str(run), "--input", str(src), "--output", str(out)]) == 2
    msg = capsys.readouterr().err
    assert f"{src}: line 2 (byte offset {at}) is not UTF-8" in msg and "save it as UTF-8" in msg
    assert "Traceback" not in msg
    # the same lines as UTF-8 with a byte-order mark (as some editors save it) are read as they are
    src.write_text("\ufeff" + first + "\n" + second + "\n", encoding="utf-8")
    rep = link_file(run, src, out, k=3, progress=False)
    assert rep.linked == 2 and rep.skipped == []
    assert [json.loads(x)["line"] for x in out.read_text(encoding="utf-8").splitlines()] == [1, 2]


def test_a_damaged_run_file_is_refused_naming_it(sample_run, tmp_path, capsys):
    ds, run = sample_run["ds"], sample_run["run"]
    damaged = tmp_path / "damaged-run"
    shutil.copytree(run, damaged)
    src, out = _one_line_input(ds, tmp_path), tmp_path / "out.jsonl"
    todo = "the run's files are damaged: train it again with `dimkit train sample+` (same settings)"
    (damaged / "model.pt").write_bytes((run / "model.pt").read_bytes()[:100])
    with pytest.raises(DataError) as err:
        Linker(damaged)
    assert err.value.file == str(damaged / "model.pt") and todo in str(err.value)
    assert cli.main(["link", str(damaged), "--input", str(src), "--output", str(out)]) == 2
    msg = capsys.readouterr().err
    assert f"{damaged / 'model.pt'}: " in msg and todo in msg and "Traceback" not in msg
    (damaged / "model.pt").write_bytes(b"")
    with pytest.raises(DataError, match="model.pt.*damaged"):
        link("A sentence.", "Dunvarra", None, model=damaged)
    shutil.copy(run / "model.pt", damaged / "model.pt")
    metrics = (run / "metrics.json").read_text()
    for text in (metrics[:40], "not json", "[1, 2]"):
        (damaged / "metrics.json").write_text(text)
        with pytest.raises(DataError) as err:
            read_run(damaged)
        assert err.value.file == str(damaged / "metrics.json") and todo in str(err.value)
    (damaged / "metrics.json").write_text(metrics)
    for text in ("{not json", '"a string"'):
        (damaged / "features.json").write_text(text)
        with pytest.raises(DataError) as err:
            Linker(damaged)
        assert err.value.file == str(damaged / "features.json") and "`dimkit train sample+` with the same" in str(err.value)
    assert cli.main(["link", str(damaged), "--input", str(src), "--output", str(out)]) == 2
    assert "features.json" in capsys.readouterr().err


def test_a_batch_line_without_an_image_is_linked_as_the_python_api_links_it(sample_run, tmp_path, capsys):
    ds, run = sample_run["ds"], sample_run["run"]
    rows = _test_mentions(ds).head(3)
    lines = [{"sentence": rows.iloc[0]["sentence"], "mention": rows.iloc[0]["mention"], "image": None},
             {"sentence": rows.iloc[1]["sentence"], "mention": rows.iloc[1]["mention"]},
             {"sentence": rows.iloc[2]["sentence"], "mention": rows.iloc[2]["mention"], "image": "nowhere.png"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "linked.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert cli.main(["link", str(run), "--input", str(src), "--output", str(out), "--k", "4"]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    assert [g["line"] for g in got] == [1, 2]
    for g, r in zip(got, [rows.iloc[0], rows.iloc[1]]):
        api = link(r["sentence"], r["mention"], None, model=run, k=4)
        assert api.attrs["image_status"] == g["image_status"] == "no_image"
        assert g["attention"]["image"] == 0.0 and g["attention"]["cue"] == 0.0, "the image input is masked"
        assert [e["qid"] for e in g["entities"]] == list(api["qid"])
        assert np.allclose([e["score"] for e in g["entities"]], api["score"], atol=1e-5)
    skipped = [json.loads(x) for x in (tmp_path / "linked.skipped.jsonl").read_text().splitlines()]
    assert [(s["line"], s["reason"]) for s in skipped] == [(3, "image_missing")]
    printed = capsys.readouterr().out
    assert "linked 2 of 3 lines" in printed and "2 of them without an image" in printed
    # allowing unusable images adds the present-but-missing one; the two without an image stay linked
    rep = link_file(run, src, tmp_path / "again.jsonl", k=2, allow_unusable_images=True, progress=False)
    assert rep.linked == 3 and rep.no_image == 2 and rep.skipped == []


def test_the_link_command_never_writes_over_its_input_or_its_own_files(sample_run, tmp_path, capsys):
    run = sample_run["run"]
    src = _one_line_input(sample_run["ds"], tmp_path)
    before = src.read_bytes()
    (tmp_path / "alias.jsonl").symlink_to(src)
    for extra, needle in [(["--output", str(src)], "--input and --output are the same file"),
                          (["--output", str(tmp_path / "alias.jsonl")], "--input and --output are the same file"),
                          (["--output", str(tmp_path / "o.jsonl"), "--skipped", str(src)],
                           "--input and --skipped are the same file"),
                          (["--output", str(tmp_path / "o.jsonl"), "--skipped", str(tmp_path / "o.jsonl")],
                           "--output and --skipped are the same file")]:
        assert cli.main(["link", str(run), "--input", str(src), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert src.read_bytes() == before and not (tmp_path / "o.jsonl").exists()
    with pytest.raises(ConfigError, match="input and output are the same file"):
        link_file(run, src, src, progress=False)


def test_a_batch_where_no_line_could_be_linked_exits_1(sample_run, tmp_path, capsys):
    src, out = tmp_path / "bad.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"sentence": "no mention"}\n{not json\n')
    assert cli.main(["link", str(sample_run["run"]), "--input", str(src), "--output", str(out)]) == 1
    assert "linked 0 of 2 lines" in capsys.readouterr().out


def test_a_run_whose_knowledge_base_changed_is_not_linked_with(sample_run, monkeypatch, capsys):
    from dimkit import runs as runs_mod

    real = runs_mod.kb_fingerprint

    def changed(dataset, data_dir=None, column="description"):
        hashes, n, path = real(dataset, data_dir, column)
        return {**hashes, "entity_qids_sha256": "0" * 64}, n + 1, path

    monkeypatch.setattr(runs_mod, "kb_fingerprint", changed)
    with pytest.raises(DataError, match=r"entities.parquet: field .qid.: the knowledge base changed since run .* retrain it"):
        Linker(sample_run["run"])
    assert cli.main(["errors", "sample+", "--run", str(sample_run["run"]), "--compare-ablation", "none"]) == 2
    assert "knowledge base changed" in capsys.readouterr().err
    # the same entities with rewritten descriptions: refused too (its entity features were of the old texts)
    monkeypatch.setattr(runs_mod, "kb_fingerprint", lambda dataset, data_dir=None, column="description": (
        {**real(dataset, data_dir, column)[0], "entity_texts_sha256": "1" * 64}, *real(dataset, data_dir, column)[1:]))
    with pytest.raises(DataError, match=r"field 'description': the entity descriptions changed since run"):
        Linker(sample_run["run"])
