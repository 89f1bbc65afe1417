"""``dimkit reproduce`` says which inputs are missing, and how to supply them, before doing any work."""
from __future__ import annotations

import pytest

from dimkit import cli, reproduce
from dimkit.errors import ConfigError

# Only the data-side checks: the expert and CLIP checks import the model libraries (slow) and are
# exercised by the notebooks.
DATA_STEPS = ("prepare", "augment")


def test_missing_release_is_named_with_where_to_put_it(kit_dirs, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    checks = reproduce.check_inputs(["wiki+", "diverse"], steps=DATA_STEPS)
    missing = [c for c in checks if not c.ok]
    assert {c.dataset for c in missing} == {"wikimel+", "wikidiverse"}
    text = reproduce.format_checks(checks)
    assert str(kit_dirs["data"] / "raw" / "wikimel") in text  # where to place the base release
    assert str(kit_dirs["data"] / "raw" / "wikimel+") in text  # or the released '+' copy
    assert "OPENAI_API_KEY not set" in text and "input(s) missing" in text
    assert "season1blue/DIM" in text and "MIMIC" in text  # where each dataset comes from


def test_placed_release_and_key_make_the_inputs_complete(kit_dirs, monkeypatch):
    (kit_dirs["data"] / "raw" / "wikimel").mkdir(parents=True)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    checks = reproduce.check_inputs(["wiki+"], steps=DATA_STEPS)
    assert all(c.ok for c in checks), reproduce.format_checks(checks)
    assert "sk-test" not in reproduce.format_checks(checks)  # the key is never shown
    assert reproduce.format_checks(checks).endswith("all inputs present")


def test_a_release_placed_under_an_alias_is_found(kit_dirs, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    raw = kit_dirs["data"] / "raw"
    text = reproduce.format_checks(reproduce.check_inputs(["rich+"], steps=DATA_STEPS))
    for folder in ("richpediamel+", "rich+", "richpediamel_plus"):  # every place looked in is named
        assert str(raw / folder) in text
    (raw / "wiki+").mkdir(parents=True)  # the released Wiki+ under the name a user types
    checks = reproduce.check_inputs(["wikimel+"], steps=DATA_STEPS)
    assert all(c.ok for c in checks), reproduce.format_checks(checks)
    assert checks[0].detail == f"will prepare from {raw / 'wiki+'}"
    assert reproduce._source("wikimel+", {}, None) == raw / "wiki+"
    (raw / "wikimel+").mkdir()  # the canonical name comes first
    assert reproduce._source("wikimel+", {}, None) == raw / "wikimel+"


def test_explicit_source_and_the_sample(kit_dirs, tmp_path):
    checks = reproduce.check_inputs(["rich"], steps=DATA_STEPS, sources={"rich": str(tmp_path / "nowhere")})
    assert not checks[0].ok and "does not exist" in checks[0].detail
    sample = reproduce.check_inputs(["sample+"], steps=DATA_STEPS)
    assert all(c.ok for c in sample) and any("oracle" in c.detail for c in sample)


def test_reproduce_refuses_to_start_with_missing_inputs(kit_dirs):
    cfg = reproduce.ReproduceConfig(datasets=("wikimel",), steps=DATA_STEPS)
    with pytest.raises(reproduce.MissingInputs, match="nothing was run"):
        reproduce.run(cfg)
    assert not (kit_dirs["data"] / "wikimel").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="step"):
        reproduce.ReproduceConfig(steps=("prepare", "bake")).validate()
    with pytest.raises(ConfigError, match="ablation"):
        reproduce.ReproduceConfig(ablations=("no_brain",)).validate()
    cfg = reproduce.ReproduceConfig(datasets=("wiki+", "wikimel+", "rich")).validate()
    assert cfg.datasets == ("wikimel+", "richpediamel")
    cfg = reproduce.ReproduceConfig(variants=("paper,released",), ablations=("none,no_cue+no_image",),
                                    steps=("prepare", "train"), sources={"wiki": "/data/wiki"}).validate()
    assert cfg.variants == ("paper", "released") and cfg.ablations == ("none", "no_cue+no_image")
    assert cfg.source_paths == {"wikimel": "/data/wiki"} and cfg.replace(k=5).sources == cfg.sources
    assert reproduce.ReproduceConfig(ablations=("all",)).validate().ablations == reproduce.ABLATIONS
    with pytest.raises(ConfigError, match="NAME=PATH"):
        reproduce.ReproduceConfig(sources=("wiki",)).validate()
    with pytest.raises(ConfigError, match="unknown reproduce setting 'epochs'; known: ablations"):
        reproduce.ReproduceConfig.for_dataset("sample", epochs=3)
    with pytest.raises(ConfigError, match="unknown reproduce setting 'stepz'; known: ablations"):
        reproduce.check_inputs(["rich"], stepz=DATA_STEPS)


def test_the_command_line_is_the_configs(kit_dirs, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    # the Makefile's form: --check, the datasets, comma lists
    argv = ["reproduce", "--check", "wiki+", "rich", "--variants", "paper,released", "--ablations", "none",
            "--steps", "prepare,augment", "--epochs", "3"]
    assert cli.main(argv + ["--show-config"]) == 0
    shown = capsys.readouterr().out
    assert '"datasets": [\n    "wikimel+",\n    "richpediamel"\n  ]' in shown and '"num_epochs": 3' in shown
    assert cli.main(argv) == 1  # inputs missing: listed, exit 1, nothing run
    out = capsys.readouterr().out
    assert "input(s) missing" in out and "--source richpediamel=PATH" in out
    assert cli.main(["reproduce", "--check", "--steps", "prepare", "augment"]) == 0  # the sample by default
    assert capsys.readouterr().out.strip().endswith("all inputs present")
    assert cli.main(["reproduce", "--check", "--steps", "bake"]) == 2
    assert "unknown step 'bake'" in capsys.readouterr().err


def test_training_goes_through_runs_and_a_failed_run_is_reported(kit_dirs, monkeypatch):
    from test_runs import install_fake_train, prepare_tiny

    calls = install_fake_train(monkeypatch, kit_dirs["runs"], fail="no_cue")
    prepare_tiny("sample+")
    # the CLIP check and name loads the model libraries: stood in for, as the trainer is
    monkeypatch.setattr(reproduce, "_check_clip", lambda name, cfg, out: None)
    monkeypatch.setattr(reproduce, "_clip_for", lambda name, clip: "sample")
    cfg = reproduce.ReproduceConfig(datasets=("sample+",), ablations=("none", "no_cue"),
                                    steps=("train",), num_epochs=2)
    report = reproduce.run(cfg, progress=False)
    assert report.runs == ["sample+-paper-none-e2"] and calls[0]["clip"] == "sample"
    assert [k for k, _ in report.failed] == ["sample+/paper/no_cue"] and "boom" in report.failed[0][1]
    assert report.exit_code == 1 and "FAILED sample+/paper/no_cue" in report.summary()
    # a rerun trains nothing that finished, and tries the failed one again
    again = reproduce.run(cfg, progress=False)
    assert again.runs == ["sample+-paper-none-e2"] and len(calls) == 1
    assert [k for k, _ in again.failed] == ["sample+/paper/no_cue"]


def test_check_shows_the_base_url_without_user_info_or_query(kit_dirs, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://bob:pw_TOPSECRET@llm.example/v1?api-key=QSECRET")
    cli.main(["reproduce", "--check", "wiki+", "--steps", "augment"])
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert "live requests to https://llm.example/v1" in text
    assert "TOPSECRET" not in text and "QSECRET" not in text and "bob" not in text


def test_check_names_an_invalid_base_url_without_a_traceback(kit_dirs, capsys, monkeypatch):
    (kit_dirs["data"] / "raw" / "wikimel").mkdir(parents=True)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    for url in ("http://bob:pw_TOPSECRET@h:99999/v1?api-key=QSECRET", "http://h:18001:/v1"):
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        assert cli.main(["reproduce", "--check", "wiki+", "--steps", "augment"]) == 1
        shown = capsys.readouterr()
        text = shown.out + shown.err
        assert "OPENAI_BASE_URL 'http://h:" in text and "is not a valid URL" in text and "MISSING" in text
        assert "Traceback" not in text and "TOPSECRET" not in text and "QSECRET" not in text


def test_a_base_url_without_a_key_is_reported_missing(kit_dirs, monkeypatch):
    (kit_dirs["data"] / "raw" / "wikimel").mkdir(parents=True)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")  # a local server needs a key too
    checks = reproduce.check_inputs(["wiki+"], steps=DATA_STEPS)
    llm = [c for c in checks if c.item == "llm answers"]
    assert len(llm) == 1 and not llm[0].ok and "OPENAI_API_KEY not set" in llm[0].detail
    assert "any non-empty value" in llm[0].fix and "OPENAI_API_KEY=" in llm[0].fix
    monkeypatch.setenv("OPENAI_API_KEY", "local")
    assert all(c.ok for c in reproduce.check_inputs(["wiki+"], steps=DATA_STEPS))
