"""Errors dimkit raises on purpose: each names the file, the record and the field at fault."""
from __future__ import annotations

import contextvars
from pathlib import Path

#: True while the ``dimkit`` command line runs, so messages name flags instead of arguments.
_CLI: contextvars.ContextVar[bool] = contextvars.ContextVar("dimkit_cli", default=False)


def option(python: str, cli: str) -> str:
    """How to tell the user to set an option: ``cli`` (``--allow-partial``) while the command line
    runs, else ``python`` (``allow_partial=True``)."""
    return cli if _CLI.get() else python


class DimkitError(Exception):
    """An error the user can act on; the CLI prints its message and exits non-zero."""


class DataError(DimkitError):
    """Bad input data: the message says which file, which record and which field."""

    def __init__(self, message: str, *, file: str | Path | None = None, record: object = None,
                 field: str | None = None):
        self.file = str(file) if file is not None else None
        self.record = record
        self.field = field
        self.reason = message
        where = []
        if self.file is not None:
            where.append(self.file)
        if record is not None:
            where.append(f"record {record!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class ConfigError(DimkitError):
    """An unknown option name or a value out of range."""


def check_positive(values: dict[str, object], *, flags: dict[str, str] | None = None) -> None:
    """Raise ConfigError unless every value is a positive int (None passes: "the default")."""
    for name, value in values.items():
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            flag = (flags or {}).get(name, "--" + name.replace("_", "-"))
            raise ConfigError(f"{option(name, flag)} must be a positive whole number, got {value!r}")
