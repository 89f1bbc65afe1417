"""The ``dimkit`` command line: flags, version, messages."""
from __future__ import annotations

import pytest


def test_cli_version_and_unknown_options(capsys):
    from dimkit.cli import main

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("dimkit ")
    for argv in (["--bogus"], ["bogus"], []):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        assert code == 2, argv


def test_cli_messages_name_flags_and_python_names_arguments():
    from dimkit.cli import _CLI
    from dimkit.errors import option

    assert option("allow_partial=True", "--allow-partial") == "allow_partial=True"
    token = _CLI.set(True)
    try:
        assert option("allow_partial=True", "--allow-partial") == "--allow-partial"
    finally:
        _CLI.reset(token)


@pytest.mark.parametrize("argv,needle", [
    (["features", "sample+", "--precision", "fp8"], "--precision fp8 is not one of fp32, fp16, bf16"),
    (["features", "sample+", "--batch-size", "0"], "--batch-size must be a positive whole number, got 0"),
    (["features", "sample+", "--image-batch-size", "-1"], "--image-batch-size must be a positive whole number"),
    (["cues", "sample+", "--max-new-tokens", "-1"], "--max-new-tokens must be a positive whole number, got -1"),
    (["cues", "sample+", "--batch-size", "0"], "--batch-size must be a positive whole number"),
])
def test_values_that_would_do_the_wrong_thing_are_refused(kit_dirs, capsys, argv, needle):
    from dimkit.cli import main

    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own choices check
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err


def test_python_api_refuses_the_same_values(kit_dirs):
    from dimkit import cues, features
    from dimkit.errors import ConfigError

    with pytest.raises(ConfigError, match="precision='fp8' is not one of fp32, fp16, bf16"):
        features.FeaturesConfig.for_dataset("sample", clip="sample", expert="none", precision="fp8")
    with pytest.raises(ConfigError, match="image_batch_size must be a positive whole number"):
        features.load_features("sample", "sample", expert="none", image_batch_size=-1)
    with pytest.raises(ConfigError, match="max_new_tokens must be a positive whole number"):
        cues.get_cues("sample", "sample-oracle", max_new_tokens=-1)
