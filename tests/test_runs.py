"""dimkit.runs, the one home of training runs: finding them, reading metrics.json (old and damaged
files included), choosing one among several, launching the missing ones -- and proof that reading
runs never imports the training code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

from dimkit import datasets, paths, runs
from dimkit.errors import ConfigError, DataError, DimkitError

ROOT = Path(__file__).resolve().parents[1]


def write_run(root: Path, name: str, dataset: str, *, variant: str = "paper", ablation: str = "none",
              status: str = "completed", weights_real: bool = True, test_h1: float = 0.5,
              dev_h1: float = 0.4, kb_h1: float = 0.3, mtime: float | None = None,
              feature_model: str = "ViT-B-32:openai", note: str = "") -> Path:
    """A metrics.json in the format of dimkit.train._write_metrics."""
    def dim(h1: float) -> dict:
        return {"H@1": h1, "H@5": min(1.0, h1 + 0.2), "H@10": min(1.0, h1 + 0.3), "H@20": min(1.0, h1 + 0.4),
                "MRR": h1 + 0.05, "MR": 3.5, "n": 10}

    def kb(h1: float) -> dict:
        return {"H@1": h1, "H@3": h1 + 0.1, "H@5": h1 + 0.15, "H@10": h1 + 0.2, "H@20": h1 + 0.25,
                "MRR": h1 + 0.07, "MR": 12.0, "n": 10}

    metrics = {"dev": {"dim": dim(dev_h1), "kb": kb(dev_h1 - 0.1)}, "test": {"dim": dim(test_h1), "kb": kb(kb_h1)}}
    strict = {"dev": {"dim": dim(dev_h1 + 0.01), "kb": kb(dev_h1 - 0.09)},
              "test": {"dim": dim(test_h1 + 0.01), "kb": kb(kb_h1 + 0.01)}}
    d = {
        "run_name": name, "status": status, "dataset": dataset, "variant": variant, "ablation": ablation,
        "protocol": {"dim": "...", "kb": "..."}, "rank_rule": "pessimistic",
        "metrics": metrics, "metrics_by_rule": {"pessimistic": metrics, "strict": strict},
        "best": {"step": 10, "epoch": 1.0}, "config": {"dataset": dataset, "variant": variant, "ablation": ablation,
                                                       "clip": "default", "lr": 5e-5},
        "seed": 114514, "feature_model": feature_model, "weights_real": weights_real, "note": note,
        "wall_time_s": 1.0, "curve": {"train": [], "dev": []},
    }
    p = root / name / "metrics.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(d))
    if mtime is not None:
        os.utime(p, (mtime, mtime))
    return p


def write_old_run(root: Path, name: str) -> Path:
    """A metrics.json as the first dimkit releases wrote it: one rank rule, no ablation key, the
    variant only in the config."""
    metrics = {"dev": {"dim": {"H@1": 0.4}}, "test": {"dim": {"H@1": 0.5}, "kb": {"H@1": 0.25}}}
    d = {"run_name": name, "status": "early_stopped", "dataset": "wiki+", "rank_rule": "strict",
         "metrics": metrics, "config": {"dataset": "wikimel+", "variant": "released", "seed": 7},
         "feature_model": "ViT-B-32:openai", "weights_real": True, "wall_time_s": 3.0}
    p = root / name / "metrics.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(d))
    return p


def install_fake_train(monkeypatch, runs_root: Path, *, fail: str = "no_cue") -> list:
    """Replace dimkit.train by a stand-in whose runs write a metrics.json at once (ablation ``fail``
    raises); returns the list of configs it trained."""
    import dimkit

    calls = []

    class Cfg:
        def __init__(self, dataset, **kw):
            self.kw = dict(kw, dataset=dataset)

        def name(self):
            k = self.kw
            return f"{k['dataset']}-{k['variant']}-{k['ablation'].replace(',', '+')}-e{k['num_epochs']}"

    def run(cfg, progress=True):
        if cfg.kw["ablation"] == fail:
            raise RuntimeError("boom")
        calls.append(cfg.kw)
        write_run(runs_root, cfg.name(), cfg.kw["dataset"], variant=cfg.kw["variant"], ablation=cfg.kw["ablation"])
        return types.SimpleNamespace(run_name=cfg.name(), run_dir=runs_root / cfg.name())

    fake = types.SimpleNamespace(TrainConfig=types.SimpleNamespace(for_dataset=Cfg), run=run)
    monkeypatch.setitem(sys.modules, "dimkit.train", fake)
    monkeypatch.setattr(dimkit, "train", fake, raising=False)
    return calls


def prepare_tiny(name: str, qids: tuple[str, ...] = ("Q1",)) -> None:
    """A one-mention prepared dataset, so that launching counts it as prepared (``qids``: its KB)."""
    m = pd.DataFrame({"mention_id": ["m1"], "split": ["test"], "sentence": ["s"], "mention": ["a"], "image": [None],
                      "qid": ["Q1"]})
    e = pd.DataFrame({"qid": list(qids), "name": ["a"] * len(qids), "description": ["d"] * len(qids),
                      "description_source": ["x"] * len(qids), "images": [[]] * len(qids)})
    datasets.write_prepared(datasets.dataset_dir(name), m, e, {"name": name})


def write_features(run_dir: Path, dataset: str, qids: tuple[str, ...] = ("Q1",), description: str = "d") -> Path:
    """A features.json as dimkit.train writes it, recording the knowledge base the run saw: ``qids``,
    each named 'a' and described ``description`` (as :func:`prepare_tiny` writes them)."""
    e = pd.DataFrame({"qid": list(qids), "name": ["a"] * len(qids), "description": [description] * len(qids)})
    p = run_dir / "features.json"
    p.write_text(json.dumps({"dataset": dataset, "feature_model": "ViT-B-32:openai", "entity_column": "description",
                             "entities": len(qids), **datasets.kb_hashes(e, "description")}))
    return p


# --- finding and reading ---------------------------------------------------------------------------


def test_collect_lists_every_run_and_says_why_one_cannot_be_used(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "good", "wiki+")
    for f in runs.LINK_FILES:
        (root / "good" / f).write_bytes(b"x")
    write_run(root, "no-model", "wiki+")
    (root / "diverged").mkdir()
    (root / "diverged" / "metrics.json").write_text(json.dumps(
        {"run_name": "diverged", "status": "diverged", "error": "loss is nan", "config": {"dataset": "wikimel"}}))
    (root / "broken").mkdir()
    (root / "broken" / "metrics.json").write_text("{not json")
    (root / "notebooks").mkdir()  # folders without metrics.json are not runs
    df = runs.collect(root)
    assert list(df.columns[:len(runs.COLUMNS)]) == list(runs.COLUMNS)
    status = dict(zip(df["run_name"], df["status"]))
    assert status == {"broken": "unreadable", "diverged": "diverged", "good": "completed", "no-model": "completed"}
    broken = df.set_index("run_name").loc["broken"]
    assert str(root / "broken" / "metrics.json") in broken["error"] and "damaged" in broken["error"]
    assert df.set_index("run_name").loc["good", "dataset"] == "wikimel+"  # the alias is canonical
    assert df.set_index("run_name").loc["good", "test dim H@1"] == 0.5  # one column per metric
    linkable = dict(zip(df["run_name"], df["linkable"]))
    assert linkable == {"broken": False, "diverged": False, "good": True, "no-model": False}
    assert set(runs.finished(df)["run_name"]) == {"good", "no-model"}
    assert list(runs.find("wiki+", runs=df, linkable=True)["run_name"]) == ["good"]
    assert len(runs.overview(df)) == 4 and runs.collect(tmp_path / "nowhere").empty


def test_an_older_metrics_file_is_read_with_what_it_holds(tmp_path):
    rec = runs.read(write_old_run(tmp_path, "old").parent)  # the folder or the file, either
    assert rec.finished and rec.key == runs.RunKey("wikimel+", "released", "none")
    assert rec.seed == 7 and rec.inputs_missing == {} and rec.curve == {"train": [], "dev": []}
    assert rec.metrics_by_rule == {"strict": rec.metrics}  # its only rule, under its name
    assert rec.metric("test", "dim", "H@1") == 0.5 == rec.metric("test", "dim", "H@1", "strict")
    assert pd.isna(rec.metric("test", "dim", "H@1", "pessimistic")) and pd.isna(rec.metric("test", "kb", "MRR"))
    assert rec.row()["test kb H@1"] == 0.25


def test_a_damaged_metrics_file_says_what_to_do(tmp_path):
    run_dir = tmp_path / "dmg"
    run_dir.mkdir()
    p = run_dir / "metrics.json"
    for data in (b"{not json", b"[1, 2]", b"", b"\xff\xfe garbage"):
        p.write_bytes(data)
        with pytest.raises(DataError) as err:
            runs.read(p)
        assert err.value.file == str(p) and "dimkit train DATASET" in str(err.value)
    (run_dir / "features.json").write_text(json.dumps({"dataset": "sample+"}))  # names the dataset in the advice
    with pytest.raises(DataError, match="train it again with `dimkit train sample\\+` \\(same settings\\)"):
        runs.read(run_dir)
    with pytest.raises(DataError, match="damaged .*; do this$"):
        runs.read(run_dir, fix="do this")
    p.unlink()
    with pytest.raises(DataError, match="missing"):
        runs.read(run_dir)
    p.write_text(json.dumps({"run_name": "dmg", "status": "diverged", "error": "loss is nan at step 8",
                             "config": {"dataset": "wikimel"}}))
    rec = runs.read(run_dir)
    assert not rec.finished and rec.dataset == "wikimel"
    with pytest.raises(DataError, match="did not finish \\(status 'diverged': loss is nan at step 8\\)"):
        rec.require_finished()


def test_a_run_whose_knowledge_base_changed_since_is_stale(kit_dirs):
    """The check dimkit link makes before linking, on every collected run: a run trained on other
    entities than the dataset now holds is marked stale, with the entity table and what to do."""
    root = kit_dirs["runs"]
    prepare_tiny("wikimel+", qids=("Q1", "Q2"))
    write_features(write_run(root, "fits", "wikimel+").parent, "wikimel+", ("Q1", "Q2"))
    write_features(write_run(root, "old-kb", "wikimel+").parent, "wikimel+", ("Q1",))
    write_run(root, "no-record", "wikimel+")  # older runs do not record their KB: nothing to compare
    write_features(write_run(root, "elsewhere", "rich+").parent, "rich+", ("Q9",))  # not prepared here
    # the same entities, described otherwise then (an LLM rewrote the descriptions since)
    write_features(write_run(root, "old-texts", "wikimel+").parent, "wikimel+", ("Q1", "Q2"), description="older")
    # a run of before the descriptions were recorded: only its qids are compared
    qids_only = write_features(write_run(root, "qids-only", "wikimel+").parent, "wikimel+", ("Q1", "Q2"), "older")
    qids_only.write_text(json.dumps({k: v for k, v in json.loads(qids_only.read_text()).items()
                                     if k != "entity_texts_sha256"}))
    df = runs.check_kb(runs.collect(root))
    status = dict(zip(df["run_name"], df["status"]))
    assert status == {"elsewhere": "completed", "fits": "completed", "no-record": "completed", "old-kb": runs.STALE,
                      "old-texts": runs.STALE, "qids-only": "completed"}
    texts = df.set_index("run_name").loc["old-texts", "error"]
    assert "field 'description'" in texts and "entity descriptions changed since run old-texts" in texts
    df = df[df["run_name"] != "old-texts"]
    why = df.set_index("run_name").loc["old-kb", "error"]
    entities = str(datasets.dataset_dir("wikimel+") / "entities.parquet")
    assert why.startswith(entities) and "field 'qid'" in why
    assert "knowledge base changed since run old-kb was trained (2 entities now, 1 then)" in why
    assert "dimkit train wikimel+" in why
    assert runs.left_out(df) == [("old-kb", why)]
    assert set(runs.find("wikimel+", runs=df)["run_name"]) == {"fits", "no-record", "qids-only"}
    assert runs.check_kb(df).equals(df)  # checking twice changes nothing


def test_launch_trains_again_a_run_whose_knowledge_base_changed(kit_dirs, monkeypatch):
    calls = install_fake_train(monkeypatch, kit_dirs["runs"])
    prepare_tiny("wikimel+", qids=("Q1", "Q2"))
    write_features(write_run(kit_dirs["runs"], "old-kb", "wikimel+").parent, "wikimel+", ("Q1",))
    rep = runs.launch([runs.RunKey("wikimel+")], reuse="key", num_epochs=2)
    assert rep.launched == ["wikimel+-paper-none-e2"] and len(calls) == 1


def test_check_name_takes_plain_names_only():
    assert paths.check_name("figure2-wiki", "--name") == "figure2-wiki"
    for bad in ("../escaped", "../../etc/x", "/abs", "a/b", ".hidden", "..", "", "a\0b"):
        with pytest.raises(ConfigError, match="--name must be a plain file or folder name"):
            paths.check_name(bad, "--name")


def test_finished_run_missing_fields_is_an_error_naming_the_field(tmp_path):
    p = tmp_path / "r" / "metrics.json"
    p.parent.mkdir()
    p.write_text(json.dumps({"run_name": "r", "status": "completed", "dataset": "wikimel", "variant": "paper",
                             "ablation": "none", "metrics": {}}))
    with pytest.raises(DataError, match="metrics"):
        runs.read(p)
    p.write_text(json.dumps({"run_name": "r", "status": "completed", "variant": "paper", "metrics": {"x": {}}}))
    with pytest.raises(DataError, match="'dataset'"):
        runs.read(p)


def test_find_narrows_by_dataset_variant_ablation_and_settings(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "a", "wikimel", mtime=1_000_000)
    write_run(root, "b", "wikimel", mtime=2_000_000)
    write_run(root, "c", "wikimel", variant="released")
    write_run(root, "d", "wikimel", ablation="no_cue")
    write_run(root, "e", "rich+")
    write_run(root, "f", "wikimel", status="diverged")
    assert list(runs.find("wikimel", "paper", "none", runs_dir=root)["run_name"]) == ["b", "a"]  # newest first
    assert set(runs.find("wikimel", runs_dir=root)["run_name"]) == {"a", "b", "c", "d"}
    assert list(runs.find(ablation="no_cue", runs_dir=root)["run_name"]) == ["d"]
    assert runs.find("wikimel", filters={"lr": 1.0}, runs_dir=root).empty
    assert len(runs.find("wikimel", filters={"lr": 5e-5, "clip": "default"}, runs_dir=root)) == 4
    assert runs.latest("wikimel", runs_dir=root) is None  # none can be linked
    assert runs.latest("wikimel", linkable=False, runs_dir=root) == root / "b"


# --- choosing ---------------------------------------------------------------------------------------


def test_choose_latest_and_best_dev_is_deterministic(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "old-better-dev", "wikimel", dev_h1=0.9, mtime=1_000_000)
    write_run(root, "new-worse-dev", "wikimel", dev_h1=0.6, mtime=2_000_000)
    write_run(root, "new-worse-dev-b", "wikimel", dev_h1=0.6, mtime=2_000_000)  # same time as the one above
    write_run(root, "also-better-dev", "wikimel", dev_h1=0.9, mtime=500_000)  # same dev score as the first
    df = runs.collect(root)
    for order in (df, df.iloc[::-1], df.sample(frac=1, random_state=3)):
        assert runs.choose(order, "latest")["run_name"] == "new-worse-dev-b"  # equal times: the larger name
        assert runs.choose(order, "best_dev")["run_name"] == "also-better-dev"  # equal scores: the smaller name
    assert runs.choose(df, "best_dev", protocol="kb")["run_name"] == "also-better-dev"
    # a run without a dev score counts as -1: never preferred to one with a score
    metrics = json.loads((root / "old-better-dev" / "metrics.json").read_text())
    metrics["metrics"].pop("dev")
    metrics["run_name"] = "a-no-dev"
    (root / "a-no-dev").mkdir()
    (root / "a-no-dev" / "metrics.json").write_text(json.dumps(metrics))
    assert runs.choose(runs.collect(root), "best_dev")["run_name"] == "also-better-dev"
    assert runs.choose(df.iloc[0:0], "latest") is None
    with pytest.raises(ConfigError, match="pick='median' is not one of latest, best_dev"):
        runs.choose(df, "median")


# --- launching --------------------------------------------------------------------------------------


def test_launch_trains_only_the_missing_ones_and_reports_failures(kit_dirs, monkeypatch):
    calls = install_fake_train(monkeypatch, kit_dirs["runs"])
    prepare_tiny("wikimel+")
    write_run(kit_dirs["runs"], "done", "wikimel+", ablation="no_image")
    keys = [runs.RunKey("wikimel+", "paper", "none"), runs.RunKey("wikimel+", "paper", "no_image"),
            runs.RunKey("wikimel+", "paper", "no_cue"), runs.RunKey("wikidiverse", "paper", "none")]
    rep = runs.launch(keys, reuse="key", num_epochs=2)
    assert rep.launched == ["wikimel+-paper-none-e2"] and calls[0]["num_epochs"] == 2
    skipped = {k.ablation if k.dataset == "wikimel+" else k.dataset: why for k, why in rep.skipped}
    assert skipped["no_image"] == "a finished run exists"
    assert "not prepared" in skipped["wikidiverse"]
    assert rep.failed[0][0].ablation == "no_cue" and "RuntimeError: boom" in rep.failed[0][1]
    assert "FAILED" in str(rep) and rep.exit_code == 1
    assert rep.run_dir(keys[0]) == kit_dirs["runs"] / "wikimel+-paper-none-e2"
    assert rep.run_dir(keys[1]) == kit_dirs["runs"] / "done" and rep.run_dir(keys[2]) is None
    assert json.loads(json.dumps(rep.to_dict()))["failed"][0][0]["ablation"] == "no_cue"
    # a second call finds what the first trained: nothing is trained twice
    again = runs.launch(keys[:2], reuse="key", num_epochs=2)
    assert again.launched == [] and len(calls) == 1 and again.exit_code == 0


def test_launch_by_config_reuses_only_a_run_of_the_same_settings(kit_dirs, monkeypatch):
    calls = install_fake_train(monkeypatch, kit_dirs["runs"])
    key = runs.RunKey("sample+", "paper", "none")
    prepare_tiny("sample+")
    write_run(kit_dirs["runs"], "other-settings", "sample+")  # same key, other settings
    rep = runs.launch([key], num_epochs=3, overrides={"seed": 1}, resume=True)
    assert rep.launched == ["sample+-paper-none-e3"] and calls[0]["seed"] == 1 and calls[0]["resume"] is True
    rep = runs.launch([key], num_epochs=3)
    assert rep.launched == [] and "finished before with the same settings" in rep.skipped[0][1]
    # a run trained with inputs missing carries a suffix, and is still the run of these settings
    write_run(kit_dirs["runs"], "sample+-paper-none-e4-missing-image", "sample+")
    assert runs.launch([key], num_epochs=4).launched == []
    assert len(calls) == 1
    with pytest.raises(ConfigError, match="reuse"):
        runs.launch([key], reuse="always")
    assert runs.launch([]).launched == []


def test_ensure_takes_the_named_run_else_the_newest_else_trains_one(kit_dirs, monkeypatch):
    root = kit_dirs["runs"]
    write_run(root, "named", "sample+")
    assert runs.ensure("sample+", run="named") == (root / "named").resolve()
    with pytest.raises(ConfigError, match="run folder not found"):
        runs.ensure("sample+", run="nowhere")
    for f in runs.LINK_FILES:
        (root / "named" / f).write_bytes(b"x")
    assert runs.ensure("sample+") == root / "named"
    calls = install_fake_train(monkeypatch, root)
    prepare_tiny("sample+")
    got = runs.ensure("sample+", "paper", "text_only", quick_epochs=2)
    assert got == root / "sample+-paper-text_only-e2" and calls[0]["resume"] is True
    with pytest.raises(DimkitError, match="none could be trained \\(RuntimeError: boom\\)"):
        runs.ensure("sample+", "paper", "no_cue")


def test_plan_keeps_original_descriptions_for_plus_datasets_only():
    assert runs.plan(["rich+"], ["paper"], ["none", "no_cue"]) == [
        runs.RunKey("richpediamel+", "paper", "none"), runs.RunKey("richpediamel+", "paper", "no_cue")]
    assert runs.plan(["rich", "rich+", "richpediamel+"], ["paper"], ["original_descriptions"]) == [
        runs.RunKey("richpediamel+", "paper", "original_descriptions")]


# --- no back-edge -------------------------------------------------------------------------------------


def test_reading_runs_never_imports_the_training_code():
    """Tables, the error analysis, link and reproduce ask dimkit.runs; only launching imports dimkit.train."""
    code = ("import sys\n"
            "import dimkit.tables, dimkit.analysis, dimkit.link, dimkit.reproduce, dimkit.runs\n"
            "print('dimkit.train' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing them loaded dimkit.train"
