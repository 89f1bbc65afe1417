"""Training runs end to end on synthetic problems: presets, resume, NaN stop, outputs (dimkit.train)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from dimkit import cli, runs, train
from dimkit_dev import synthetic
from dimkit.errors import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    return synthetic.make_problem(n_mentions=500, n_groups=20, group_size=3, dim=32, seed=0)


def _cfg(**kw):
    base = dict(hidden=32, heads=4, lr=3e-3, batch_size=32, num_epochs=4, eval_steps=0, warmup_steps=5,
                patience=0)
    base.update(kw)
    return train.TrainConfig.for_dataset("synthetic", **base)


# ---------------------------------------------------------------- config


def test_presets_come_from_the_released_scripts():
    wiki = train.TrainConfig.for_dataset("wiki+")
    assert wiki.dataset == "wikimel+"
    assert (wiki.lr, wiki.batch_size, wiki.num_epochs, wiki.dropout, wiki.weight_decay) == (5e-5, 64, 300, 0.4, 1e-3)
    # hidden None = the CLIP feature size: 512 with ViT-B/32, the scripts' value
    assert (wiki.hidden, wiki.heads, wiki.seed, wiki.warmup_steps, wiki.max_grad_norm) == (None, 8, 114514, 100, 1.0)
    assert (wiki.loss, wiki.l2_reg, wiki.negatives, wiki.num_negatives) == ("npair", 0.02, "tfidf", 1)
    rich = train.TrainConfig.for_dataset("rich+", variant="released", num_epochs=5)
    assert (rich.lr, rich.batch_size, rich.num_epochs, rich.variant) == (5e-5, 64, 5, "released")
    div = train.TrainConfig.for_dataset("diverse+")
    assert (div.lr, div.batch_size, div.num_epochs, div.candidate_limit) == (5e-6, 128, 500, 79)
    keys = {frozenset(p) for p in train.PRESETS.values()}
    assert len(keys) == 1, "every preset has the same keys"
    assert train.TrainConfig.for_dataset("sample+").num_epochs < 100


def test_unknown_names_and_bad_values_fail():
    with pytest.raises(ConfigError, match="unknown train setting 'learning_rate'"):
        train.TrainConfig.for_dataset("wiki+", learning_rate=1e-3)
    with pytest.raises(ConfigError, match="variant"):
        train.TrainConfig.for_dataset("wiki+", variant="fancy")
    with pytest.raises(ConfigError, match="wrong type"):
        train.TrainConfig.for_dataset("wiki+", num_epochs="5")
    with pytest.raises(ConfigError, match="ablation"):
        train.TrainConfig.for_dataset("wiki+", ablation="no_text")
    with pytest.raises(ConfigError, match="no_attention"):
        train.TrainConfig.for_dataset("wiki+", variant="released", ablation="no_attention")
    with pytest.raises(ConfigError):
        train.TrainConfig.for_dataset("wiki+", lr=-1.0)
    with pytest.raises(ConfigError, match="select_protocol"):
        train.TrainConfig.for_dataset("wiki+", protocols="kb")
    with pytest.raises(ConfigError, match="unknown train setting 'nope'"):
        train.TrainConfig.parse_sets(["nope=1"])
    assert train.TrainConfig.parse_sets(["lr=1e-4", "patience=3", "resume=true", "candidate_limit=none"]) == {
        "lr": 1e-4, "patience": 3, "resume": True, "candidate_limit": None}
    with pytest.raises(ConfigError, match="valid int"):
        train.TrainConfig.parse_sets(["patience=three"])


def test_run_names_follow_the_config_not_the_device():
    a = train.TrainConfig.for_dataset("rich+", variant="released")
    assert a.name().startswith("richpediamel+-released-full-s114514-")
    assert dataclasses.replace(a, device="cpu", resume=False).name() == a.name()
    assert a.resume, "a rerun reads a finished run back instead of training it again"
    assert dataclasses.replace(a, lr=1e-4).name() != a.name()
    assert train.TrainConfig.for_dataset("rich+", ablation="text_only").name().startswith("richpediamel+-paper-text_only-")
    # the CLIP that `auto` picks, spelled out (as make reproduce passes it), is the same run
    for ds, spellings in (("rich+", ("default", "ViT-B-32:openai")), ("sample+", ("sample", "dimkit-sample-clip"))):
        auto = train.TrainConfig.for_dataset(ds)
        assert all(dataclasses.replace(auto, clip=c).name() == auto.name() for c in spellings)
        assert dataclasses.replace(auto, clip="ViT-B-32:random").name() != auto.name()


def test_a_run_records_the_settings_that_differ_from_its_preset():
    preset = train.TrainConfig.for_dataset("rich+", variant="released")
    assert train.off_preset(preset) == {}
    assert train.off_preset(dataclasses.replace(preset, seed=7, clip="default")) == {}  # a repeat, auto's CLIP
    short = dataclasses.replace(preset, num_epochs=5, lr=1e-4)
    assert train.off_preset(short) == {"lr": [1e-4, preset.lr], "num_epochs": [5, preset.num_epochs]}


def test_cli_registers_train_and_reports_bad_keys(capsys, kit_dirs):
    assert "train" in cli.COMMANDS
    assert cli.main(["train", "rich+", "--variant", "released", "--epochs", "5", "--set", "patience=3",
                     "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\nrun folder")[0])
    assert (shown["variant"], shown["num_epochs"], shown["patience"], shown["dataset"]) == (
        "released", 5, 3, "richpediamel+")
    assert cli.main(["train", "rich+", "--set", "bogus=1", "--show-config"]) == 2
    assert "unknown train setting 'bogus'" in capsys.readouterr().err


# ---------------------------------------------------------------- runs


def test_paper_beats_text_only_when_images_decide(problem, kit_dirs):
    ds, fs = problem
    full = train.run(_cfg(num_epochs=10, lr=1e-2), dataset=ds, features=fs)
    text = train.run(_cfg(num_epochs=10, lr=1e-2, ablation="text_only"), dataset=ds, features=fs)
    h_full, h_text = full.metrics["test"]["dim"]["H@1"], text.metrics["test"]["dim"]["H@1"]
    assert h_full > h_text + 0.25, (h_full, h_text)
    assert full.metrics["test"]["kb"]["H@1"] > text.metrics["test"]["kb"]["H@1"] + 0.2

    # results are data: metrics.json holds everything a table needs
    d = json.loads(full.metrics_path.read_text())
    for key in ("dataset", "variant", "ablation", "protocol", "metrics", "config", "seed", "feature_model",
                "weights_real", "wall_time_s", "curve", "note", "status", "best"):
        assert key in d, key
    assert d["status"] == "completed" and d["weights_real"] is False and "not comparable" in d["note"]
    assert set(d["metrics"]) == {"dev", "test"} and set(d["metrics"]["test"]) == {"dim", "kb"}
    assert {"H@1", "H@3", "H@5", "H@10", "H@20", "MRR", "MR"} <= set(d["metrics"]["test"]["kb"])
    assert len(d["curve"]["train"]) == 10 and len(d["curve"]["dev"]) == 10
    assert d["metrics"]["dev"]["dim"]["H@1"] == pytest.approx(max(p["dim"]["H@1"] for p in d["curve"]["dev"]))
    assert runs.read(full.run_dir).require_finished().metrics == full.metrics

    pred = pd.read_parquet(full.run_dir / "predictions.parquet")
    test_pred = pred[pred.split == "test"]
    assert len(test_pred) == full.metrics["test"]["kb"]["n"]
    assert (test_pred.rank_kb == 1).mean() == pytest.approx(full.metrics["test"]["kb"]["H@1"])
    assert ((test_pred.rank_kb == 1) == [t[0] == q for t, q in zip(test_pred.top5, test_pred.qid)]).all()

    model, cfg = train.load_model(full.run_dir)
    assert cfg.variant == "paper"
    table = train.results_table([full, text])
    assert table.shape[0] == 4 and table["rank rule"].tolist() == ["strict (released)", "pessimistic"] * 2
    # both rank rules, side by side, in metrics.json; strict (ties favour the gold) is never worse
    assert set(d["metrics_by_rule"]) == {"strict", "pessimistic"} and d["metrics"] == d["metrics_by_rule"]["pessimistic"]
    for split in ("dev", "test"):
        for proto in ("dim", "kb"):
            s_, p_ = d["metrics_by_rule"]["strict"][split][proto], d["metrics_by_rule"]["pessimistic"][split][proto]
            assert s_["H@1"] >= p_["H@1"] and s_["MR"] <= p_["MR"]
    assert "released rule" in d["rank_rules"]["strict"]


def test_released_variant_runs_without_any_cue(problem, kit_dirs):
    ds, fs = problem
    no_cue = dataclasses.replace(fs, cue=None, cue_ok=np.zeros(len(fs.mention_ids), dtype=bool))
    r = train.run(_cfg(variant="released", num_epochs=2), dataset=ds, features=no_cue)
    assert r.counts["missing_cues"] == len(fs.mention_ids)
    assert 0 <= r.metrics["test"]["dim"]["H@1"] <= 1


def test_original_descriptions_ablation(problem, kit_dirs):
    ds, fs = problem
    r = train.run(_cfg(num_epochs=2, ablation="original_descriptions", negatives="random"), dataset=ds,
                  features=fs)
    assert r.ablation == "original_descriptions"
    with pytest.raises(ConfigError, match="original descriptions"):
        train.run(_cfg(ablation="original_descriptions"), dataset=ds,
                  features=dataclasses.replace(fs, entity_original=None))


class _Interrupt(KeyboardInterrupt):
    pass


def test_resume_ends_exactly_like_an_uninterrupted_run(problem, kit_dirs, capsys):
    ds, fs = problem
    # evaluation (and checkpoint) every 5 steps, 11 steps an epoch: checkpoints fall mid-epoch
    kw = dict(num_epochs=3, eval_steps=5, negatives="tfidf", variant="paper")
    full = train.run(_cfg(run_name="full", **kw), dataset=ds, features=fs)

    def stop_at_step_13(event):
        if event["event"] == "step" and event["step"] == 13:
            raise _Interrupt()  # like Ctrl-C after the checkpoint of step 10

    with pytest.raises(KeyboardInterrupt):
        train.run(_cfg(run_name="cut", **kw), dataset=ds, features=fs, callback=stop_at_step_13)
    ck = train.load_checkpoint(kit_dirs["runs"] / "cut" / "checkpoint.pt")
    assert ck["state"]["step"] == 10 and not (kit_dirs["runs"] / "cut" / "metrics.json").exists()

    steps = []
    resumed = train.run(_cfg(run_name="cut", resume=True, **kw), dataset=ds, features=fs,
                        callback=lambda e: steps.append(e["step"]) if e["event"] == "step" else None)
    assert "resuming cut from step 10" in capsys.readouterr().out
    assert steps[0] == 11
    assert resumed.metrics == full.metrics
    assert resumed.curve == full.curve
    assert resumed.best == full.best

    # a finished run resumes to its results without training again
    steps.clear()
    again = train.run(_cfg(run_name="cut", resume=True, **kw), dataset=ds, features=fs,
                      callback=lambda e: steps.append(e))
    assert steps == [] and again.metrics == full.metrics

    # a different config never continues someone else's checkpoint
    with pytest.raises(ConfigError, match="lr"):
        train.run(_cfg(run_name="cut", resume=True, lr=1e-2, **kw), dataset=ds, features=fs)

    # features from another model: the checkpoint is stale, the run trains again
    other = dataclasses.replace(fs, model_id="another-clip")
    steps.clear()
    train.run(_cfg(run_name="cut", resume=True, **kw), dataset=ds, features=other,
              callback=lambda e: steps.append(e["step"]) if e["event"] == "step" else None)
    assert steps[0] == 1 and "training again" in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(problem, kit_dirs, monkeypatch):
    ds, fs = problem
    real = train.compute_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 8 else loss

    monkeypatch.setattr(train, "compute_loss", poisoned)
    cfg = _cfg(run_name="nan", eval_steps=3)
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 8 .*checkpoint.*is kept"):
        train.run(cfg, dataset=ds, features=fs)
    run_dir = kit_dirs["runs"] / "nan"
    ck = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ck["state"]["step"] == 6
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    status = json.loads((run_dir / "metrics.json").read_text())
    assert status["status"] == "diverged" and "step 8" in status["error"]
    with pytest.raises(Exception, match="did not finish"):
        runs.read(run_dir).require_finished()


def test_early_stopping_on_dev_h1(problem, kit_dirs):
    ds, fs = problem
    r = train.run(_cfg(num_epochs=30, lr=1e-9, patience=2), dataset=ds, features=fs)
    assert r.status == "early_stopped"
    assert len(r.curve["dev"]) == 3  # the first evaluation is the best; two more without improvement
    assert r.best["step"] == r.curve["dev"][0]["step"]


def test_strict_rule_and_kb_only_selection(problem, kit_dirs):
    ds, fs = problem
    r = train.run(_cfg(num_epochs=1, rank_rule="strict", protocols="kb", select_protocol="kb",
                       negatives="random"), dataset=ds, features=fs)
    assert set(r.metrics["test"]) == {"kb"}
    assert json.loads(r.metrics_path.read_text())["rank_rule"] == "strict"


def test_non_finite_features_are_named_before_training(problem, kit_dirs):
    ds, fs = problem
    bad = fs.image.copy()
    bad[7, 3] = np.nan
    with pytest.raises(Exception, match=r"record 'm00007'.*field 'image'.*non-finite"):
        train.run(_cfg(), dataset=ds, features=dataclasses.replace(fs, image=bad))
    with pytest.raises(Exception, match="mention order"):
        train.run(_cfg(), dataset=ds, features=dataclasses.replace(fs, mention_ids=fs.mention_ids[::-1]))


# ---------------------------------------------------------------- inputs that are not there


def _no_images_no_cues(fs):
    n = len(fs.mention_ids)
    return dataclasses.replace(fs, image=np.zeros_like(fs.image), image_ok=np.zeros(n, bool),
                               cue=np.zeros_like(fs.cue), cue_ok=np.zeros(n, bool))


def test_mostly_missing_inputs_refuse_the_paper_variant_and_mark_other_runs(problem, kit_dirs, capsys):
    ds, fs = problem
    ds = dataclasses.replace(ds, mentions=ds.mentions.assign(image=None))  # like a MELBench raw file
    bare = _no_images_no_cues(fs)
    with pytest.raises(ConfigError, match=r"100% of the mentions have no usable image \(the dataset references "
                                          r"no mention image.*100% .* no cue.*ablation='text_only'"):
        train.run(_cfg(num_epochs=1), dataset=ds, features=bare)
    assert not list(kit_dirs["runs"].iterdir())  # refused before anything was written

    text = train.run(_cfg(num_epochs=1, ablation="text_only"), dataset=ds, features=bare)
    assert text.inputs_missing == {} and "missing" not in text.run_name  # it does not use them

    forced = train.run(_cfg(num_epochs=1, allow_missing_inputs=True), dataset=ds, features=bare)
    assert forced.run_name.endswith("-missing-image+cue")
    d = json.loads(forced.metrics_path.read_text())
    assert set(d["inputs_missing"]) == {"image", "cue"} and d["inputs_missing"]["image"]["share"] == 1.0
    assert d["note"].startswith("INPUTS MOSTLY MISSING (image 100%, cue 100% of mentions lack them)")
    assert "WARNING" in capsys.readouterr().err

    released = train.run(_cfg(num_epochs=1, variant="released"), dataset=ds, features=bare)
    assert released.run_name.endswith("-missing-image+cue") and "WARNING" in capsys.readouterr().err
    assert runs.read(released.run_dir).inputs_missing["cue"]["share"] == 1.0


def test_every_input_is_checked_before_the_features_are_computed(problem, kit_dirs, monkeypatch):
    import dimkit.features

    ds, _ = problem

    def never(*a, **k):
        raise AssertionError("features were computed before the inputs were checked")
    monkeypatch.setattr(dimkit.features, "load_features", never)
    no_cands = dataclasses.replace(ds, _candidates=None)
    with pytest.raises(ConfigError, match="no candidate lists"):
        train.run(_cfg(), dataset=no_cands)
    no_orig = dataclasses.replace(ds, entities=ds.entities.drop(columns="description_original"))
    with pytest.raises(ConfigError, match="original descriptions"):
        train.run(_cfg(ablation="original_descriptions"), dataset=no_orig)


def test_damaged_checkpoint_model_and_metrics_are_named(problem, kit_dirs):
    ds, fs = problem
    r = train.run(_cfg(num_epochs=1, run_name="dmg"), dataset=ds, features=fs)
    ck = r.run_dir / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    with pytest.raises(train.DataError, match=r"checkpoint.pt.*damaged.*rerun with resume=False") as err:
        train.run(_cfg(num_epochs=1, run_name="dmg", resume=True), dataset=ds, features=fs)
    assert err.value.file == str(ck)
    model = r.run_dir / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(train.DataError, match="damaged.*train the run again") as err:
        train.load_model(r.run_dir)
    assert err.value.file == str(model)
    (r.run_dir / "metrics.json").write_text('{"status": "compl')
    with pytest.raises(train.DataError, match="metrics.json is damaged"):
        runs.read(r.run_dir)
    # with --no-resume the damaged run is simply trained again
    again = train.run(_cfg(num_epochs=1, run_name="dmg", resume=False), dataset=ds, features=fs)
    assert runs.read(again.run_dir).metrics == again.metrics


# ---------------------------------------------------------------- the released procedure


def test_the_released_variant_trains_with_the_released_procedure_unless_a_key_says_otherwise():
    rel = train.TrainConfig.for_dataset("wiki+", variant="released")
    assert (rel.optimizer, rel.patience, rel.stop_list, rel.seeding) == ("released", 0, "released", "released")
    paper = train.TrainConfig.for_dataset("wiki+")
    assert (paper.optimizer, paper.patience, paper.stop_list, paper.seeding) == ("torch", 20, "dimkit", "dimkit")
    mixed = train.TrainConfig.for_dataset("wiki+", variant="released", optimizer="torch", patience=5)
    assert (mixed.optimizer, mixed.patience, mixed.stop_list) == ("torch", 5, "released")
    assert train.procedure(mixed)["optimizer"] == {
        "value": "torch", "released": False, "what": train.DIMKIT_PROCEDURE["optimizer"]}
    with pytest.raises(ConfigError, match="optimizer='adam' is not one of released, torch"):
        train.TrainConfig.for_dataset("wiki+", optimizer="adam")


def test_a_released_run_runs_every_epoch_and_records_its_procedure(problem, kit_dirs):
    ds, fs = problem
    r = train.run(_cfg(variant="released", num_epochs=4, lr=1e-9, **train.RELEASED_PROCEDURE), dataset=ds,
                  features=fs)
    assert r.status == "completed" and len(r.curve["dev"]) == 4  # no early stop, even with nothing learnt
    d = json.loads(r.metrics_path.read_text())
    assert {k: v["value"] for k, v in d["procedure"].items()} == train.RELEASED_PROCEDURE
    assert all(v["released"] for v in d["procedure"].values())
    assert isinstance(train.load_checkpoint(r.run_dir / "checkpoint.pt")["optimizer"]["state"], dict)


def test_released_seeding_resumes_exactly(problem, kit_dirs):
    ds, fs = problem
    kw = dict(num_epochs=3, eval_steps=5, variant="released", **train.RELEASED_PROCEDURE)
    full = train.run(_cfg(run_name="rfull", **kw), dataset=ds, features=fs)

    def stop_at_step_13(event):
        if event["event"] == "step" and event["step"] == 13:
            raise _Interrupt()

    with pytest.raises(KeyboardInterrupt):
        train.run(_cfg(run_name="rcut", **kw), dataset=ds, features=fs, callback=stop_at_step_13)
    resumed = train.run(_cfg(run_name="rcut", resume=True, **kw), dataset=ds, features=fs)
    assert resumed.metrics == full.metrics and resumed.curve == full.curve
    other = train.run(_cfg(run_name="rdimkit", **dict(kw, seeding="dimkit")), dataset=ds, features=fs)
    assert other.curve != full.curve  # the seeding is a real switch


def test_a_finished_run_on_unchanged_inputs_is_read_back_without_features(kit_dirs, monkeypatch, capsys):
    """A rerun of the chain neither recomputes features nor evaluates again; changed inputs do."""
    import dimkit.features
    from dimkit import datasets

    cfg = train.TrainConfig.for_dataset("sample+", num_epochs=1)
    first = train.run(cfg, progress=False)
    real = dimkit.features.load_features
    monkeypatch.setattr(dimkit.features, "load_features",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("features loaded again")))
    again = train.run(cfg, progress=False)
    assert "read back" in capsys.readouterr().out
    assert again.metrics == first.metrics and again.run_dir == first.run_dir
    # another dataset content: the key changes, the run is evaluated again (features needed)
    root = datasets.dataset_dir("sample+")
    m = datasets.load("sample+").mentions
    m.loc[0, "sentence"] = m.loc[0, "sentence"] + " (edited)"
    m.to_parquet(root / "mentions.parquet")
    import pytest as _pytest

    with _pytest.raises(AssertionError, match="features loaded again"):
        train.run(cfg, progress=False)
    monkeypatch.setattr(dimkit.features, "load_features", real)
    assert train.run(cfg, progress=False).status == "completed"


def test_gradient_clipping_can_be_turned_off(problem, kit_dirs):
    ds, fs = problem
    assert train.TrainConfig.coerce("max_grad_norm", "none") is None
    cfg = _cfg(num_epochs=1).replace(max_grad_norm=None)  # (for_dataset: None keeps the preset)
    assert train.run(cfg, dataset=ds, features=fs).status == "completed"


def test_a_run_another_process_is_training_is_refused_not_trained_twice(problem, kit_dirs):
    import subprocess
    import sys

    from dimkit.errors import DimkitError

    ds, fs = problem
    lock = kit_dirs["runs"] / ".locks" / "busy.lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); "
        "f.write('process 4242'); f.flush(); print('held', flush=True); time.sleep(60)"), str(lock)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DimkitError, match="run busy is being written by process 4242 right now"):
            train.run(_cfg(run_name="busy", num_epochs=1), dataset=ds, features=fs)
        assert not (kit_dirs["runs"] / "busy").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (even killed, its lock went with it): the run trains, and a second call reads it back
    first = train.run(_cfg(run_name="busy", num_epochs=1), dataset=ds, features=fs)
    assert first.status == "completed" and not lock.parent.exists()  # nothing left behind


def test_a_finished_run_is_trained_again_not_read_back_when_its_knowledge_base_changed(problem, kit_dirs, capsys):
    ds, fs = problem
    first = train.run(_cfg(run_name="kb", num_epochs=1), dataset=ds, features=fs)
    assert first.status == "completed"
    capsys.readouterr()
    # one entity more (the features grow with it), same settings, same run name
    extra = ds.entities.iloc[[0]].assign(qid="Q999999", name="Newcomer")
    ds2 = dataclasses.replace(ds, entities=pd.concat([ds.entities, extra], ignore_index=True))
    fs2 = dataclasses.replace(fs, entity=np.vstack([fs.entity, fs.entity[:1]]),
                              entity_original=np.vstack([fs.entity_original, fs.entity_original[:1]]),
                              entity_qids=[*fs.entity_qids, "Q999999"])
    again = train.run(_cfg(run_name="kb", num_epochs=1), dataset=ds2, features=fs2)
    out = capsys.readouterr().out
    assert "knowledge base or its descriptions changed since kb was trained: training it again" in out
    assert "finished earlier" not in out and again.status == "completed"
    assert json.loads((again.run_dir / "features.json").read_text())["entities"] == len(ds2.entities)


def test_a_run_trained_with_clip_auto_is_the_run_of_the_clip_auto_picks(problem, kit_dirs, capsys):
    ds, fs = problem
    first = train.run(_cfg(num_epochs=1), dataset=ds, features=fs)
    capsys.readouterr()
    again = train.run(_cfg(num_epochs=1, clip="default"), dataset=ds, features=fs)
    assert again.run_dir == first.run_dir and "finished earlier" in capsys.readouterr().out
    recorded = json.loads(first.metrics_path.read_text())["off_preset"]  # what the tables read
    assert recorded["num_epochs"] == [1, train.TrainConfig.for_dataset("synthetic").num_epochs]
    assert runs.read(first.run_dir).off_preset == recorded
