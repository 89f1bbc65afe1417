"""``dimkit reproduce`` says which inputs are missing, and how to supply them, before doing any work."""
from __future__ import annotations

import pytest

from dimkit import reproduce
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


def test_explicit_source_and_the_sample(kit_dirs, tmp_path):
    checks = reproduce.check_inputs(["rich"], steps=DATA_STEPS, sources={"rich": str(tmp_path / "nowhere")})
    assert not checks[0].ok and "does not exist" in checks[0].detail
    sample = reproduce.check_inputs(["sample+"], steps=DATA_STEPS)
    assert all(c.ok for c in sample) and any("oracle" in c.detail for c in sample)


def test_reproduce_refuses_to_start_with_missing_inputs(kit_dirs):
    cfg = reproduce.ReproduceConfig(datasets=("wikimel",), steps=DATA_STEPS)
    with pytest.raises(reproduce.MissingInputs, match="nothing was run"):
        reproduce.reproduce(cfg)
    assert not (kit_dirs["data"] / "wikimel").exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="step"):
        reproduce.ReproduceConfig(steps=("prepare", "bake")).validate()
    with pytest.raises(ConfigError, match="ablation"):
        reproduce.ReproduceConfig(ablations=("no_brain",)).validate()
    cfg = reproduce.ReproduceConfig(datasets=("wiki+", "wikimel+", "rich")).validate()
    assert cfg.datasets == ("wikimel+", "richpediamel")
