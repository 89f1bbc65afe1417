"""The table builder on hand-made metrics files, the ``dimkit tables`` stage, and the committed
reference values. Reading, choosing and launching runs is tested in test_runs.py."""
from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest
from test_runs import write_run

from dimkit import cli, tables
from dimkit.errors import ConfigError, DataError
from dimkit.runs import RunKey, collect, overview, plan

REF_HEADER = "dataset,protocol,method,ablation,metric,value,source,note\n"


@pytest.fixture
def reference(tmp_path) -> pd.DataFrame:
    p = tmp_path / "ref.csv"
    p.write_text(REF_HEADER
                 + "wikimel+,dim,DIM,none,H@1,,DIM paper: fill from the PDF,unknown\n"
                 + "richpediamel+,dim,DIM,none,H@1,40.0,made-up test source,\n"
                 + "wikimel,kb,MIMIC,none,H@1,87.98,MIMIC paper,\n")
    return tables.load_reference(p)


def pess(frame: pd.DataFrame) -> pd.DataFrame:
    """The pessimistic-rule rows of a table (every run fills a strict and a pessimistic row)."""
    return frame[frame["rank rule"].isin(["pessimistic", ""])]  # "": a row no run fills


def spec(name: str) -> tables.TableSpec:
    return {s.name: s for s in tables.standard_tables()}[name]


def set_off_preset(metrics_file, **settings) -> None:
    """Record, as dimkit.train does, settings that differ from the preset (``name=[value, preset]``)
    in a hand-made metrics.json, keeping its time."""
    st = metrics_file.stat()
    d = json.loads(metrics_file.read_text())
    d["off_preset"] = settings
    metrics_file.write_text(json.dumps(d))
    os.utime(metrics_file, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_missing_runs_and_missing_reference_are_na(tmp_path, reference):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir, "wplus", "wiki+", test_h1=0.625)  # alias is canonicalised
    runs = collect(runs_dir)
    t = tables.build_table(spec("enhanced_dim"), runs, reference)
    f = pess(t.frame).set_index(["dataset", "method"])
    paper = tables.VARIANT_LABELS["paper"]
    assert f.loc[("wikimel+", paper), "H@1"] == pytest.approx(62.5)
    assert f.loc[("wikimel+", paper), "run"] == "wplus"
    assert math.isnan(f.loc[("wikimel+", paper), "H@1 ref"])  # the DIM paper value is empty
    assert math.isnan(f.loc[("wikimel+", paper), "Δ H@1"])
    assert math.isnan(f.loc[("wikidiverse+", paper), "H@1"])  # no run at all
    assert f.loc[("wikidiverse+", paper), "runs matched"] == 0
    # a reference value without a run: shown, difference n/a
    assert f.loc[("richpediamel+", paper), "H@1 ref"] == pytest.approx(40.0)
    assert math.isnan(f.loc[("richpediamel+", paper), "Δ H@1"])
    assert len(t.frame) == 7  # 3 datasets x 2 variants, empty rows kept; the run fills two (both rank rules)
    md = t.to_markdown()
    assert "| Wiki+ | DIM (dimkit, paper variant) | pessimistic | 62.50 | n/a | n/a |" in md
    assert "n/a" in t.to_csv() and "Δ = dimkit − ref" in t.caption
    assert not t.warnings  # real weights, no sample: nothing to warn about


def test_difference_is_dimkit_minus_reference_in_points(tmp_path, reference):
    write_run(tmp_path / "runs", "r", "rich+", test_h1=0.455)
    t = tables.build_table(spec("enhanced_dim"), collect(tmp_path / "runs"), reference)
    row = pess(t.frame)[(pess(t.frame)["dataset"] == "richpediamel+") & (pess(t.frame)["method"] == tables.VARIANT_LABELS["paper"])]
    assert row["Δ H@1"].iloc[0] == pytest.approx(5.5)
    assert "+5.50" in t.to_markdown()
    assert "made-up test source" in t.caption  # the reference's source is named


def test_protocols_never_share_a_table(tmp_path, reference):
    write_run(tmp_path / "runs", "w", "wikimel", test_h1=0.9, kb_h1=0.25)
    runs = collect(tmp_path / "runs")
    dim = tables.build_table(spec("original_dim"), runs, reference).frame
    kb = tables.build_table(spec("original_kb"), runs, reference).frame
    assert list(dim.columns[2:6]) == ["rank rule", "H@1", "H@1 ref", "Δ H@1"] and "H@20" in dim and "MRR" not in dim
    assert "H@3" in kb and "MRR" in kb and "H@20" not in kb
    paper = tables.VARIANT_LABELS["paper"]
    assert pess(dim).set_index(["dataset", "method"]).loc[("wikimel", paper), "H@1"] == pytest.approx(90.0)
    k = pess(kb).set_index(["dataset", "method"])
    assert k.loc[("wikimel", paper), "H@1"] == pytest.approx(25.0)
    assert k.loc[("wikimel", paper), "MRR"] == pytest.approx(32.0)
    # published whole-KB numbers get their own row, only in the whole-KB table
    assert k.loc[("wikimel", "MIMIC (published)"), "H@1 ref"] == pytest.approx(87.98)
    assert math.isnan(k.loc[("wikimel", "MIMIC (published)"), "H@1"])
    assert "MIMIC (published)" not in set(dim["method"])


def test_sample_run_caption_warns(tmp_path, reference):
    write_run(tmp_path / "runs", "s", "sample+", test_h1=0.6)
    runs = collect(tmp_path / "runs")
    t = tables.build_table(spec("sample_dim"), runs, reference)
    assert tables.SAMPLE_WARNING in t.caption
    assert list(t.frame["dataset"]) == ["sample+", "sample+"]  # empty sample rows are dropped
    assert list(t.frame["rank rule"]) == ["strict (released)", "pessimistic"]
    assert "sample+ (synthetic)" in t.to_markdown()
    # a sample run in a custom table warns too, even when the spec is not the sample's
    custom = tables.TableSpec("x", "x", ("sample+",), "dim", (tables.RowSpec("DIM"),))
    assert tables.SAMPLE_WARNING in tables.build_table(custom, runs, reference).caption
    # an empty sample table says so instead of showing nothing
    empty = tables.build_table(spec("sample_dim"), runs.iloc[0:0], reference)
    assert len(empty.frame) == 0 and "No finished" in empty.to_markdown()


def test_weights_not_real_caption_warns(tmp_path, reference):
    write_run(tmp_path / "runs", "w", "wikimel", weights_real=False, feature_model="ViT-B-32:random")
    t = tables.build_table(spec("original_dim"), collect(tmp_path / "runs"), reference)
    assert any("without real pretrained weights" in w and "ViT-B-32:random" in w for w in t.warnings)
    assert "not comparable to the paper" in t.caption
    assert "not comparable to the paper" in t.to_latex()


def test_several_runs_per_cell_pick_is_deterministic(tmp_path, reference):
    root = tmp_path / "runs"
    write_run(root, "old-better-dev", "wikimel", test_h1=0.7, dev_h1=0.9, mtime=1_000_000)
    write_run(root, "new-worse-dev", "wikimel", test_h1=0.5, dev_h1=0.6, mtime=2_000_000)
    write_run(root, "released", "wikimel", variant="released", test_h1=0.1)  # another row
    runs = collect(root)
    paper = tables.VARIANT_LABELS["paper"]
    latest = tables.build_table(spec("original_dim"), runs, reference, pick="latest")
    row = pess(latest.frame).set_index(["dataset", "method"]).loc[("wikimel", paper)]
    assert row["run"] == "new-worse-dev" and row["runs matched"] == 2 and row["H@1"] == pytest.approx(50.0)
    assert "matched several runs" in latest.caption and "latest" in latest.caption
    best = tables.build_table(spec("original_dim"), runs, reference, pick="best_dev")
    row = pess(best.frame).set_index(["dataset", "method"]).loc[("wikimel", paper)]
    assert row["run"] == "old-better-dev" and row["H@1"] == pytest.approx(70.0)
    assert "best dev H@1" in best.caption
    # equal times: the tie is broken by run name, the same on every call
    write_run(root, "new-worse-dev-b", "wikimel", test_h1=0.3, mtime=2_000_000)
    runs = collect(root)
    picks = {tables.build_table(spec("original_dim"), runs, reference).frame.iloc[0]["run"] for _ in range(3)}
    assert picks == {"new-worse-dev-b"}
    # filters narrow the candidates by config keys
    f = tables.build_table(spec("original_dim"), runs, reference, filters={"lr": 1.0})
    assert f.frame["runs matched"].sum() == 0
    with pytest.raises(Exception, match="pick"):
        tables.build_table(spec("original_dim"), runs, reference, pick="median")


def test_a_run_with_the_presets_settings_is_preferred_to_newer_or_better_ones(kit_dirs, reference):
    """`dimkit train rich+ --variant released --epochs 5 --set lr=1e-4` is newer than the preset run, and a
    run with the paper's procedure switches has a better dev score: neither fills the released row while
    the preset run is there; without it, the caption and the summary name the run used and how it differs."""
    root = kit_dirs["runs"]
    released = tables.VARIANT_LABELS["released"]
    write_run(root, "preset", "rich+", variant="released", test_h1=0.5, dev_h1=0.4, mtime=1_000_000)
    set_off_preset(write_run(root, "short", "rich+", variant="released", test_h1=0.2, mtime=3_000_000),
                   lr=[1e-4, 5e-5], num_epochs=[5, 300])
    set_off_preset(write_run(root, "torch-opt", "rich+", variant="released", test_h1=0.9, dev_h1=0.9,
                             mtime=2_000_000), optimizer=["torch", "released"], patience=[20, 0])
    write_run(root, "paper", "rich+", test_h1=0.7)  # an older run that does not say counts as a preset run
    runs = collect(root)
    for pick in ("latest", "best_dev"):
        t = tables.build_table(spec("enhanced_dim"), runs, reference, pick=pick)
        f = pess(t.frame).set_index(["dataset", "method"])
        assert f.loc[("richpediamel+", released), "run"] == "preset", pick
        assert f.loc[("richpediamel+", released), "runs matched"] == 3
        assert f.loc[("richpediamel+", tables.VARIANT_LABELS["paper"]), "run"] == "paper"
        assert t.off_preset == [] and "preset settings" in t.caption
    # latest among the preset runs, as before
    write_run(root, "preset-2", "rich+", variant="released", test_h1=0.6, dev_h1=0.3, mtime=1_500_000)
    runs = collect(root)
    pick = {p: pess(tables.build_table(spec("enhanced_dim"), runs, reference, pick=p).frame)
            .set_index(["dataset", "method"]).loc[("richpediamel+", released), "run"] for p in tables.PICKS}
    assert pick == {"latest": "preset-2", "best_dev": "preset"}

    for name in ("preset", "preset-2"):
        (root / name / "metrics.json").unlink()
    runs = collect(root)
    t = tables.build_table(spec("enhanced_dim"), runs, reference)
    assert pess(t.frame).set_index(["dataset", "method"]).loc[("richpediamel+", released), "run"] == "short"
    assert t.off_preset == [f"richpediamel+ / {released}: short (lr=0.0001 (preset 5e-05), num_epochs=5 (preset 300))"]
    assert "Not trained with the dataset's preset settings" in t.caption and t.off_preset[0] in t.to_markdown()
    best = tables.build_table(spec("enhanced_dim"), runs, reference, pick="best_dev")
    assert best.off_preset == [f"richpediamel+ / {released}: torch-opt (optimizer='torch' (preset 'released'), "
                               "patience=20 (preset 0))"]

    result = tables.run(tables.TablesConfig.for_dataset("rich"))
    text = result.summary()
    assert "1 cell(s) filled by a run not trained with the dataset's preset settings" in text
    assert f"  {t.off_preset[0]}" in text.splitlines()
    assert result.to_dict()["off_preset"] == t.off_preset


def test_unfinished_and_broken_runs_are_listed_not_used(tmp_path, reference):
    root = tmp_path / "runs"
    (root / "diverged").mkdir(parents=True)
    (root / "diverged" / "metrics.json").write_text(json.dumps(
        {"run_name": "diverged", "status": "diverged", "error": "loss is nan", "config": {"dataset": "wikimel"}}))
    (root / "broken").mkdir()
    (root / "broken" / "metrics.json").write_text("{not json")
    (root / "notebooks").mkdir()  # folders without metrics.json are not runs
    runs = collect(root)
    assert dict(zip(runs["run_name"], runs["status"])) == {"broken": "unreadable", "diverged": "diverged"}
    assert "broken" in runs.set_index("run_name").loc["broken", "error"]
    t = tables.build_table(spec("original_dim"), runs, reference)
    assert t.frame["runs matched"].sum() == 0 and t.frame["H@1"].isna().all()
    assert len(overview(runs)) == 2


def test_a_run_trained_on_an_older_knowledge_base_fills_no_cell_and_is_named(kit_dirs, reference, monkeypatch):
    """The dataset was prepared again with other entities since the run was trained (dimkit link refuses
    such a run): its numbers are left out, and the caption, the summary and index.md say which run, why
    and what to do; --launch-missing trains it again."""
    from test_runs import install_fake_train, prepare_tiny, write_features

    prepare_tiny("wikimel+", qids=("Q1", "Q2"))  # now: two entities
    old = write_run(kit_dirs["runs"], "old-kb", "wikimel+", test_h1=0.9).parent
    write_features(old, "wikimel+", ("Q1",))  # trained when the KB held one
    paper = tables.VARIANT_LABELS["paper"]
    for t in (tables.build_table(spec("enhanced_dim"), collect(kit_dirs["runs"]), reference),
              tables.build_tables([spec("enhanced_dim")], reference=reference)["enhanced_dim"]):
        row = pess(t.frame).set_index(["dataset", "method"]).loc[("wikimel+", paper)]
        assert math.isnan(row["H@1"]) and row["runs matched"] == 0 and row["run"] is None
        assert t.stale == ["old-kb"] and "knowledge base" in t.caption and "old-kb" in t.to_markdown()
    assert tables.build_table(spec("original_dim"), collect(kit_dirs["runs"]), reference).stale == []
    assert RunKey("wikimel+") in tables.missing_runs([spec("enhanced_dim")], collect(kit_dirs["runs"]))

    result = tables.run(tables.TablesConfig.for_dataset("wikimel"))
    assert result.runs_used == 0 and RunKey("wikimel+") in result.missing
    text = result.summary()
    assert "1 run(s) left out of the tables:" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("  old-kb: "))
    assert "entities.parquet" in line and "knowledge base changed" in line and "dimkit train wikimel+" in line
    assert "old-kb" in result.to_dict()["left_out"]
    assert "## Runs left out" in (tables.tables_dir() / "index.md").read_text()

    calls = install_fake_train(monkeypatch, kit_dirs["runs"])
    launched = tables.run(tables.TablesConfig.for_dataset("wikimel", launch_missing=True, num_epochs=2,
                                                          launch_datasets=["wikimel+"]))
    assert [c["dataset"] for c in calls] == ["wikimel+"] and launched.runs_used == 1
    row = pess(launched.tables["enhanced_dim"].frame).set_index(["dataset", "method"]).loc[("wikimel+", paper)]
    assert row["run"] == "wikimel+-paper-none-e2"


def test_a_damaged_metrics_file_is_named_in_the_summary(kit_dirs):
    write_run(kit_dirs["runs"], "good", "sample+", test_h1=0.6)
    (kit_dirs["runs"] / "X").mkdir()
    (kit_dirs["runs"] / "X" / "metrics.json").write_text("{")
    result = tables.run(tables.TablesConfig.for_dataset("sample"))
    assert result.runs_used == 1 and [name for name, _ in result.left_out] == ["X"]
    text = result.summary()
    line = next(ln for ln in text.splitlines() if ln.startswith("  X: "))
    assert str(kit_dirs["runs"] / "X" / "metrics.json") in line and "damaged" in line
    assert "train it again" in line  # what to do
    assert set(pess(result.tables["sample_dim"].frame)["run"]) == {"good"}  # never used
    assert "damaged" in result.to_dict()["left_out"]["X"]
    assert "`X`" in (tables.tables_dir() / "index.md").read_text()


def test_write_tables_csv_markdown_latex(tmp_path, reference):
    write_run(tmp_path / "runs", "s", "sample+", test_h1=0.6, weights_real=False, feature_model="sample-clip")
    built = tables.build_tables(runs_dir=tmp_path / "runs", reference=tmp_path / "ref.csv")
    assert set(built) == {f"{t}_{p}" for t in ("original", "enhanced", "ablations", "sample") for p in ("dim", "kb")}
    files = tables.write_tables(built, tmp_path / "out")
    names = {p.name for p in files}
    assert {"sample_dim.csv", "sample_dim.md", "sample_dim.tex", "ablations_kb.tex", "index.md"} <= names
    csv = pd.read_csv(tmp_path / "out" / "sample_dim.csv")  # n/a reads back as NaN
    assert csv.loc[0, "rank rule"] == "strict (released)" and csv.loc[0, "H@1"] == pytest.approx(61.0)
    assert csv.loc[1, "H@1"] == pytest.approx(60.0) and math.isnan(csv.loc[1, "H@1 ref"])
    tex = (tmp_path / "out" / "sample_dim.tex").read_text()
    assert "\\begin{tabular}" in tex and "\\caption{" in tex and "sample+ (synthetic)" in tex
    assert "sample-clip" in tex  # the weights warning reaches the LaTeX caption
    ablations = pd.read_csv(tmp_path / "out" / "ablations_dim.csv")
    assert len(ablations) == 3 * len(tables.ABLATION_LABELS)  # every cell, n/a where no run
    assert "text only" in set(ablations["method"])
    # the default folder is $DIMKIT_FIGURES/tables
    assert tables.tables_dir().name == "tables"


def test_missing_runs_lists_unfilled_cells(tmp_path, reference):
    write_run(tmp_path / "runs", "w", "wikimel+")
    runs = collect(tmp_path / "runs")
    miss = tables.missing_runs([spec("ablations_dim")], runs, only=["wiki+"])
    assert RunKey("wikimel+", "paper", "none") not in miss
    assert RunKey("wikimel+", "paper", "no_cue") in miss
    assert {k.dataset for k in miss} == {"wikimel+"}
    assert plan(["rich+"], ["paper"], ["none", "no_cue"]) == [
        RunKey("richpediamel+", "paper", "none"), RunKey("richpediamel+", "paper", "no_cue")]
    # only '+' datasets keep original descriptions to ablate to
    assert plan(["rich", "rich+"], ["paper"], ["original_descriptions"]) == [
        RunKey("richpediamel+", "paper", "original_descriptions")]


# --- the committed reference file ----------------------------------------------------------------


def test_committed_reference_has_sources_and_no_invented_dim_number():
    ref = tables.load_reference()  # validates: numeric values, a source for each value, no duplicates
    raw = pd.read_csv(tables.REFERENCE_FILE, dtype=str, keep_default_na=False)
    filled = raw[raw["value"].str.strip() != ""]
    assert len(filled) and (filled["source"].str.strip() != "").all()
    dim_rows = ref[ref["method"] == "DIM"]
    assert len(dim_rows) and dim_rows["value"].isna().all(), "never invent a DIM paper number"
    assert (dim_rows["protocol"] == "dim").all()
    # the published whole-KB H@1 of MIMIC and MMoE, with their source
    got = {(r.method, r.dataset): r.value for r in ref[ref["value"].notna()].itertuples()}
    assert got == {("MIMIC", "wikimel"): 87.98, ("MIMIC", "richpediamel"): 81.02, ("MIMIC", "wikidiverse"): 63.51,
                   ("MMoE", "wikimel"): 90.77, ("MMoE", "richpediamel"): 85.51, ("MMoE", "wikidiverse"): 77.57}
    assert set(ref.loc[ref["value"].notna(), "protocol"]) == {"kb"}


@pytest.mark.parametrize("line, field", [
    ("wikimel,kb,MIMIC,none,H@1,87.98,,\n", "source"),
    ("wikimel,kb,MIMIC,none,H@1,about 88,somewhere,\n", "value"),
    ("wikimel,top,MIMIC,none,H@1,,,\n", "protocol"),
    ("Wiki Mel!,kb,MIMIC,none,H@1,,,\n", "dataset"),
])
def test_reference_validation_names_line_and_field(tmp_path, line, field):
    p = tmp_path / "ref.csv"
    p.write_text(REF_HEADER + line)
    with pytest.raises(DataError) as err:
        tables.load_reference(p)
    assert field in str(err.value) and "line 2" in str(err.value)


def test_reference_duplicates_are_rejected(tmp_path):
    p = tmp_path / "ref.csv"
    p.write_text(REF_HEADER + "wiki+,dim,DIM,none,H@1,,x,\nwikimel+,dim,DIM,,H@1,,x,\n")
    with pytest.raises(DataError, match="two rows"):
        tables.load_reference(p)


# --- the stage: dimkit tables -------------------------------------------------------------------


def test_tables_config_checks_what_notebook_04_passes():
    cfg = tables.TablesConfig.for_dataset("rich", variants=["paper", "released"], num_epochs=None)
    assert cfg.dataset == "richpediamel" and cfg.launch_names == ["richpediamel", "richpediamel+"]
    assert cfg.shown() == [f"{t}_{p}" for p in ("dim", "kb") for t in ("original", "enhanced", "ablations")]
    assert cfg.plan() == [RunKey(d, v) for d in ("richpediamel", "richpediamel+") for v in ("paper", "released")]
    sample = tables.TablesConfig.for_dataset("sample", launch_datasets=["sample+"], ablations=["none", "text_only"])
    assert sample.is_sample and sample.shown() == ["sample_dim", "sample_kb"] and sample.launch_names == ["sample+"]
    with pytest.raises(ConfigError, match="variants: 'paper-ish' is not one of paper, released"):
        tables.TablesConfig.for_dataset("sample", variants=["paper-ish"])
    with pytest.raises(ConfigError, match="ablations"):
        tables.TablesConfig.for_dataset("sample", ablations=["no_brain"])
    with pytest.raises(ConfigError, match="split='train' is not one of test, dev"):
        tables.TablesConfig.for_dataset("sample", split="train")
    with pytest.raises(ConfigError, match="known: ablations, clip"):
        tables.TablesConfig.for_dataset("sample", launch=True)


def test_tables_stage_launches_the_missing_cells_then_builds(kit_dirs, monkeypatch):
    from test_runs import install_fake_train, prepare_tiny

    calls = install_fake_train(monkeypatch, kit_dirs["runs"])
    prepare_tiny("wikimel+")
    write_run(kit_dirs["runs"], "there", "wikimel", test_h1=0.8)
    cfg = tables.TablesConfig.for_dataset("wikimel", launch_missing=True, num_epochs=2, out=str(kit_dirs["figures"]))
    result = tables.run(cfg)
    # wikimel has a run; wikimel+ had none and is trained; nothing else
    assert [c["dataset"] for c in calls] == ["wikimel+"] and result.launch.launched == ["wikimel+-paper-none-e2"]
    assert result.runs_used == 2 and result.exit_code == 0
    row = pess(result.tables["enhanced_dim"].frame).set_index(["dataset", "method"])
    assert row.loc[("wikimel+", tables.VARIANT_LABELS["paper"]), "run"] == "wikimel+-paper-none-e2"
    assert (kit_dirs["figures"] / "index.md").exists() and len(result.files) == 3 * len(result.tables) + 1
    text = result.summary()
    assert "launched 1 run(s)" in text and "**Results on the original datasets" in text
    assert json.loads(json.dumps(result.to_dict()))["launch"]["launched"] == ["wikimel+-paper-none-e2"]


def test_the_tables_command_writes_and_prints_the_familys_tables(kit_dirs, capsys):
    write_run(kit_dirs["runs"], "s", "sample+", test_h1=0.6, weights_real=False, feature_model="sample-clip")
    assert cli.main(["tables", "--pick", "best_dev"]) == 0
    out = capsys.readouterr().out
    assert "**The bundled synthetic sample" in out and tables.SAMPLE_WARNING in out
    assert "run choice 'best_dev'" in out and "--launch-missing" in out
    assert (tables.tables_dir() / "sample_dim.md").exists()


def test_a_dataset_of_ones_own_gets_its_own_table(kit_dirs, capsys):
    """Runs on a dataset that is neither a paper dataset nor the sample are shown, not dropped."""
    write_run(kit_dirs["runs"], "mine", "mydata+", test_h1=0.42)
    write_run(kit_dirs["runs"], "mine-released", "mydata", variant="released", test_h1=0.3)
    assert cli.main(["tables", "--dataset", "mydata"]) == 0
    out = capsys.readouterr().out
    assert "Results on mydata and mydata+" in out
    csv = pd.read_csv(tables.tables_dir() / "mydata_dim.csv")
    assert set(csv["dataset"]) == {"mydata", "mydata+"}
    row = csv[(csv["dataset"] == "mydata+") & (csv["rank rule"] == "pessimistic")]
    assert row["H@1"].iloc[0] == pytest.approx(42.0)


def test_a_dataset_of_ones_own_without_runs_says_so(kit_dirs, capsys):
    """README's `dimkit tables --dataset mydata` before anything was prepared or trained: the paper's
    tables are still written, and the summary says that no run was found and how to prepare the dataset."""
    assert cli.main(["tables", "--dataset", "mydata"]) == 0
    out = capsys.readouterr().out
    assert f"No run of mydata/mydata+ was found in {kit_dirs['runs']}" in out
    assert "mydata is not prepared here" in out and "`dimkit prepare SRC --name mydata`" in out
    assert "mydata+ is not prepared here" in out and "`dimkit augment mydata --out mydata+`" in out
    assert (tables.tables_dir() / "original_dim.csv").exists()
    # prepared but not trained: how to train it instead
    from test_runs import prepare_tiny

    prepare_tiny("mydata")
    result = tables.run(tables.TablesConfig.for_dataset("mydata"))
    assert any("mydata is prepared" in n and "`dimkit train mydata`" in n for n in result.notes)
    # a run of either dataset of the family: nothing to say
    write_run(kit_dirs["runs"], "mine", "mydata+", test_h1=0.42)
    assert tables.run(tables.TablesConfig.for_dataset("mydata")).notes == []
    assert tables.run(tables.TablesConfig.for_dataset("sample")).notes == []
