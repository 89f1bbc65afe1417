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
    (["train", "sample+", "--lr", "nan"], "--lr must be a finite number, got nan"),
    (["train", "sample+", "--set", "temperature=inf"], "temperature must be a finite number, got inf"),
    (["train", "sample+", "--seed", "-1"], "--seed must be >= 0, got -1"),
    (["train", "sample+", "--set", "max_grad_norm=0"], "max_grad_norm must be > 0"),  # 0 zeroes every gradient
    (["augment", "sample", "--timeout", "nan"], "--timeout must be a finite number"),
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


# ---------------------------------------------------------------- every stage's command line is its config

#: Every command that is a stage (the others, info and notebooks, are not): see test_every_command_is_listed.
STAGES = ("prepare", "images", "candidates", "augment", "cues", "features", "train", "link", "tables", "figure2",
          "reproduce", "errors")
#: Flags that READMEs, notebooks and scripts use: they keep their spelling.
KEPT_FLAGS = {
    "prepare": ["--name", "--layout", "--subset", "--images", "--seed", "--copy-images", "--data-dir"],
    "images": ["--max-pixels", "--workers", "--no-write"],
    "candidates": ["--k", "--workers", "--force", "--replace-released"],
    "cues": ["--expert", "--prompt", "--max-new-tokens", "--batch-size", "--device", "--base-url", "--workers",
             "--shard", "--force"],
    "features": ["--clip", "--expert", "--device", "--precision", "--batch-size", "--image-batch-size", "--workers",
                 "--shard", "--save", "--force"],
    "link": ["--input", "--output", "--k", "--batch-size", "--device", "--expert", "--allow-unusable-images",
             "--skipped"],
}


def _help(capsys, command: str) -> str:
    from dimkit.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", STAGES)
def test_every_stage_flag_comes_from_its_config(command, capsys):
    import dataclasses
    import importlib
    import re

    from dimkit.cli import COMMANDS
    from dimkit.stage import Config

    module = importlib.import_module(COMMANDS[command][0])
    config = module.CONFIG
    assert issubclass(config, Config) and callable(module.run)
    assert not hasattr(module, "add_arguments") and not hasattr(module, "run_cli"), "no hand-written command line"
    text = _help(capsys, command)
    usage = text.split("\n\n")[0]
    fields = dataclasses.fields(config)
    expected = {"-h", "--set", "--show-config"}
    for f in fields:
        if f.metadata.get("cli") is False:
            assert config.flag(f.name) == f"--set {f.name}"
            continue
        flag = config.flag(f.name)
        assert flag in usage, f"{command}: {f.name} has no {flag} in --help"
        if not flag.startswith("--"):  # the positional argument
            continue
        expected.add(flag)
        if config.__dataclass_fields__[f.name].type in ("bool", "bool | None"):
            expected.add("--no-" + flag[2:])
    assert set(re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", usage)) == expected, "a flag without a setting"
    for flag in KEPT_FLAGS.get(command, []):
        assert flag in usage, f"{command} lost {flag}"


def _python_message(build) -> str:
    from dimkit.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        build()
    return str(err.value)


def _bad_values():
    from dimkit import candidates, cues, features, images, prepare
    from dimkit.link import link_file  # dimkit.link is also the package's link() function

    return [
        ("prepare", lambda: prepare.PrepareConfig(src="src", dataset="x", layout="zip").validate(),
         ["prepare", "src", "--name", "x", "--layout", "zip"],
         "layout='zip' is not one of auto, dim, mimic, melbench"),
        ("prepare", lambda: prepare.PrepareConfig(src="src").validate(), ["prepare", "src"],
         "prepare: dataset must be given"),
        ("images", lambda: images.ImagesConfig.for_dataset("tiny", max_pixels=0),
         ["images", "tiny", "--max-pixels", "0"], "max_pixels must be a positive whole number, got 0"),
        ("candidates", lambda: candidates.CandidatesConfig.for_dataset("tiny", k=0),
         ["candidates", "tiny", "--k", "0"], "k must be a positive whole number, got 0"),
        ("candidates", lambda: candidates.CandidatesConfig.for_dataset("tiny", workers=-3),
         ["candidates", "tiny", "--workers", "-3"], "workers must be -1 (all cores) or a positive number, got -3"),
        ("cues", lambda: cues.get_cues("tiny", batch_size=0), ["cues", "tiny", "--batch-size", "0"],
         "batch_size must be a positive whole number, got 0"),
        ("cues", lambda: cues.get_cues("tiny", shard="1-2"), ["cues", "tiny", "--shard", "1-2"],
         "shard must be 'auto' or look like 0/2, got '1-2'"),
        ("features", lambda: features.load_features("tiny", "sample", precision="fp8"),
         ["features", "tiny", "--precision", "fp8"], "precision='fp8' is not one of fp32, fp16, bf16"),
        ("features", lambda: features.load_features("tiny", "sample", image_batch_size=-1),
         ["features", "tiny", "--image-batch-size", "-1"], "image_batch_size must be a positive whole number, got -1"),
        ("features", lambda: features.load_features("tiny", "sample", flush_rows=0),
         ["features", "tiny", "--set", "flush_rows=0"], "flush_rows must be a positive whole number, got 0"),
        ("link", lambda: link_file("run", "in.jsonl", "out.jsonl", k=0),
         ["link", "run", "--input", "in.jsonl", "--output", "out.jsonl", "--k", "0"],
         "k must be a positive whole number, got 0"),
        ("link", lambda: link_file("run", "in.jsonl", "out.jsonl", batch_size=0),
         ["link", "run", "--input", "in.jsonl", "--output", "out.jsonl", "--batch-size", "0"],
         "batch_size must be a positive whole number, got 0"),
    ]


@pytest.mark.parametrize("command, build, argv, in_python", _bad_values(),
                         ids=[" ".join(dict.fromkeys(case[2][:1] + case[2][-2:])) for case in _bad_values()])
def test_python_and_the_command_line_refuse_a_bad_value_with_one_message(command, build, argv, in_python, kit_dirs,
                                                                         capsys):
    """The same check and the same text; the message names the argument in Python and the flag on
    the command line."""
    from dimkit.cli import _CLI, main

    assert _python_message(build) == in_python
    token = _CLI.set(True)
    try:
        on_the_command_line = _python_message(build)
    finally:
        _CLI.reset(token)
    assert on_the_command_line != in_python           # a flag instead of the argument name
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"dimkit {command}: error: {on_the_command_line}\n"
    assert not (kit_dirs["data"] / "tiny").exists()     # refused before anything was read or written


def test_unknown_settings_are_refused_with_the_known_ones(kit_dirs, capsys):
    import json

    from dimkit import features
    from dimkit.cli import main
    from dimkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown features setting 'bogus'; known: batch_size, clip, "):
        features.load_features("tiny", bogus=1)
    assert main(["features", "tiny", "--set", "bogus=1"]) == 2
    assert "unknown features setting 'bogus'; known: batch_size, clip, " in capsys.readouterr().err
    assert main(["features", "rich+", "--workers", "3", "--set", "flush_rows=8", "--show-config"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["dataset"], shown["workers"], shown["flush_rows"], shown["shard"]) == ("richpediamel+", 3, 8, "auto")


def test_every_command_is_a_stage_or_listed_as_not_one():
    from dimkit.cli import COMMANDS

    assert set(COMMANDS) == set(STAGES) | {"info", "notebooks"}


def test_help_calls_only_settings_without_a_default_required(capsys):
    """A list setting built by a default factory (figure2's --datasets) is optional, and says so."""
    import re

    text = re.sub(r"\s+", " ", _help(capsys, "figure2"))
    datasets = text.split("--datasets DATASETS [DATASETS ...]", 2)[2]
    datasets = datasets.split(" --", 1)[0]
    assert "required" not in datasets and "default []" not in datasets, datasets
    assert "default: every prepared one" in datasets
    # a required setting says so first, not after its last word (link's --input ends "... and id")
    link = re.sub(r"\s+", " ", _help(capsys, "link"))
    assert "--input INPUT required: UTF-8 JSONL" in link and "and id (required)" not in link
