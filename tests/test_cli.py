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
