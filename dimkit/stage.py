"""The one shape of every stage: a config dataclass and ``run(config) -> result``.

A stage module (``dimkit.prepare``, ``dimkit.train``, ...) defines

- a :class:`Config` subclass: every setting a field with its default and a one-line help
  (:func:`setting`), dataset presets in ``PRESETS`` (same keys for every dataset), cross-field
  checks in :meth:`Config.check`;
- ``run(config) -> result``, the result a :class:`Result`: it prints a readable summary, converts to
  a dict and saves itself as JSON.

What is written once here instead of in every stage: typed overrides that refuse unknown keys with
the list of known ones (:meth:`Config.for_dataset`, :meth:`Config.replace`), ``--set key=value``,
the type, choice and range checks, and the command line (:meth:`Config.add_arguments`,
:meth:`Config.from_args`), so a flag, a notebook parameter and a Python argument are checked alike.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

from .errors import ConfigError, option


def setting(default: Any = None, help: str = "", *, choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
            min: float | None = None, above: float | None = None, cli: bool | str = True,
            positional: bool = False, factory: Callable[[], Any] | None = None) -> Any:
    """A config field: its default, a one-line help, and what values it takes.

    ``choices`` (a sequence, or a function returning one), ``min`` (inclusive) and ``above``
    (exclusive) are checked by :meth:`Config.validate`. ``cli``: False keeps it off the command line
    (still settable with ``--set``), a string gives its flag another name. ``positional`` makes it
    the command's positional argument. A field annotated ``Path`` takes a str or any path object.
    """
    meta = {"help": help, "choices": choices, "min": min, "above": above, "cli": cli, "positional": positional}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _kind(annotation: Any) -> tuple[str, bool]:
    """``("int" | "float" | "str" | "path" | "bool" | "list" | "dict" | "any", optional)`` of an annotation string."""
    text = str(annotation).replace(" ", "")
    parts = text.split("|")
    optional = "None" in parts
    base = next((p for p in parts if p != "None"), "Any")
    if base == "Path":
        return "path", optional
    for kind in ("bool", "int", "float", "str", "list", "tuple", "dict"):
        if base == kind or base.startswith(kind + "["):
            return ("list" if kind == "tuple" else kind), optional
    return "any", optional


def _type_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "path":
        return isinstance(value, (str, os.PathLike))
    if kind == "list":
        return isinstance(value, (list, tuple))
    if kind == "dict":
        return isinstance(value, dict)
    return True


@dataclass
class Config:
    """Base of every stage's settings (see the module docstring)."""

    #: Per-dataset values, keyed by the base dataset name; ``"default"`` is used for any other.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}
    #: The command this config belongs to (for messages: ``train setting 'lr'``).
    STAGE: ClassVar[str] = "stage"

    # ---- building
    @classmethod
    def names(cls) -> list[str]:
        """Every setting's name."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def _refuse_unknown(cls, keys) -> None:
        unknown = sorted(set(keys) - set(cls.names()))
        if unknown:
            raise ConfigError(f"unknown {cls.STAGE} setting {unknown[0]!r}; known: {', '.join(sorted(cls.names()))}")

    @classmethod
    def preset(cls, dataset: str) -> dict[str, Any]:
        """The preset values for ``dataset`` (an empty dict when the stage has none)."""
        from .datasets import base_name

        return dict(cls.PRESETS.get(base_name(dataset), cls.PRESETS.get("default", {})))

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any):
        """The dataset's preset with ``overrides`` applied (None keeps the preset), validated."""
        from .datasets import canonical_name

        cls._refuse_unknown(overrides)
        values = cls.preset(dataset)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "dataset" in cls.names():
            values["dataset"] = canonical_name(dataset)
        return cls(**values).validate()

    def replace(self, **overrides: Any):
        """A copy with ``overrides`` (None included, e.g. ``candidate_limit=None``), validated."""
        self._refuse_unknown(overrides)
        return dataclasses.replace(self, **overrides).validate()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-safe: paths as text)."""
        return _plain(dataclasses.asdict(self))

    # ---- checking
    @classmethod
    def flag(cls, name: str) -> str:
        """How the command line sets ``name``: its flag (``--batch-size``), its positional argument
        (``SRC``) or, for a setting without a flag, ``--set name``."""
        meta = next(f for f in dataclasses.fields(cls) if f.name == name).metadata
        if meta.get("positional"):
            return name.upper()
        cli = meta.get("cli", True)
        if cli is False:
            return f"--set {name}"
        return cli if isinstance(cli, str) else "--" + name.replace("_", "-")

    @classmethod
    def label(cls, name: str, *value: Any) -> str:
        """A setting (and a value) as a message names it: ``batch_size`` / ``precision='fp8'`` in
        Python, ``--batch-size`` / ``--precision fp8`` on the command line."""
        flag = cls.flag(name)
        if not value:
            return option(name, flag)
        sep = "=" if flag.startswith("--set ") else " "
        return option(f"{name}={value[0]!r}", f"{flag}{sep}{value[0]}")

    def validate(self):
        """Check every value's type, choices and range, then :meth:`check`; returns self.

        The messages are the same in Python and on the command line, except that they name the
        argument (``batch_size``) in one and the flag (``--batch-size``) in the other.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            kind, optional = _kind(f.type)
            if value is None:
                if optional:
                    continue
                raise ConfigError(f"{self.STAGE}: {self.label(f.name)} must be given")
            if not _type_ok(kind, value):
                raise ConfigError(f"{self.STAGE} setting {self.label(f.name, value)} has the wrong type "
                                  f"(expected {f.type})")
            if kind == "path" and not isinstance(value, Path):
                value = Path(value)
                setattr(self, f.name, value)
            meta = f.metadata
            choices = meta.get("choices")
            if callable(choices):
                choices = choices()
            if choices is not None and value not in choices:
                raise ConfigError(f"{self.label(f.name, value)} is not one of {', '.join(map(str, choices))}")
            if kind == "float" and not math.isfinite(value):  # nan passes every comparison below
                raise ConfigError(f"{self.label(f.name)} must be a finite number, got {value!r}")
            low, above = meta.get("min"), meta.get("above")
            if kind == "int" and (low == 1 or above == 0) and value < 1:
                raise ConfigError(f"{self.label(f.name)} must be a positive whole number, got {value!r}")
            if low is not None and value < low:
                raise ConfigError(f"{self.label(f.name)} must be >= {low}, got {value!r}")
            if above is not None and value <= above:
                raise ConfigError(f"{self.label(f.name)} must be > {above}, got {value!r}")
        if isinstance(getattr(self, "dataset", None), str):
            from .datasets import canonical_name

            self.dataset = canonical_name(self.dataset)
        self.check()
        return self

    def check(self) -> None:
        """Cross-field checks of a stage (raise ConfigError); values are already typed."""

    # ---- text -> values
    @classmethod
    def coerce(cls, name: str, text: str) -> Any:
        """The typed value of ``--set name=text``."""
        cls._refuse_unknown([name])
        f = next(f for f in dataclasses.fields(cls) if f.name == name)
        kind, optional = _kind(f.type)
        if optional and text.strip().lower() in ("none", "null", ""):
            return None
        try:
            if kind == "bool":
                low = text.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(text)
                return low in ("true", "1", "yes")
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
            if kind == "list":
                return [t.strip() for t in text.split(",") if t.strip()]
            if kind == "path":
                return Path(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not a valid {kind}") from None
        return text

    @classmethod
    def parse_sets(cls, pairs: Sequence[str] | None) -> dict[str, Any]:
        """``["lr=1e-4", "patience=5"]`` -> typed overrides (unknown keys raise ConfigError)."""
        out: dict[str, Any] = {}
        for pair in pairs or []:
            if "=" not in pair:
                raise ConfigError(f"--set expects key=value, got {pair!r}")
            key, text = pair.split("=", 1)
            out[key.strip()] = cls.coerce(key.strip(), text)
        return out

    # ---- the command line
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per setting (``--batch-size``), the positional ones, ``--set`` and ``--show-config``.

        Flags default to None, so what is not given keeps the dataset's preset.
        """
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta.get("cli") is False:
                continue
            kind, optional = _kind(f.type)
            # Choices are left to validate(), so a flag and a Python argument get the same message.
            choices = meta.get("choices")
            choices = None if callable(choices) else choices
            metavar = ("{" + ",".join(map(str, choices)) + "}" if choices
                       else cls.flag(f.name).lstrip("-").replace("-", "_").upper())  # --epochs EPOCHS
            default = f.default if f.default is not dataclasses.MISSING else None
            has_factory = f.default_factory is not dataclasses.MISSING  # type: ignore[misc]
            help_text = meta.get("help", "")
            if meta.get("positional"):
                parser.add_argument(f.name, metavar=f.name.upper(), help=help_text)
                continue
            flag = cls.flag(f.name)
            preset = any(f.name in p for p in cls.PRESETS.values())
            shown = (" (default: the dataset's preset)" if preset else
                     f" (default {default})" if default not in (None, "", False) and kind != "bool" else "")
            if default is None and not optional and not has_factory:
                help_text = f"required: {help_text}"  # first, so it cannot be read as said of the last word
            if kind == "bool":
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                    help=help_text)
            elif kind == "list":
                parser.add_argument(flag, dest=f.name, nargs="+", default=None, help=help_text + shown)
            else:
                typ = {"int": int, "float": float}.get(kind, str)
                parser.add_argument(flag, dest=f.name, type=typ, default=None, metavar=metavar,
                                    help=help_text + shown)
        # the example is one of this command's own settings, preferably one without a flag
        fields = [f for f in dataclasses.fields(cls)
                  if not f.metadata.get("positional") and f.default not in (None, dataclasses.MISSING)]
        example = next((f for f in fields if f.metadata.get("cli") is False), fields[0] if fields else None)
        shown = f", e.g. --set {example.name}={example.default}" if example is not None else ""
        parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="_set",
                            help=f"set any setting, flag or not (repeatable){shown}")
        parser.add_argument("--show-config", action="store_true", dest="_show_config",
                            help="print the resolved settings and exit")

    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The config of parsed command-line arguments: preset, then flags, then ``--set``."""
        given = {k: v for k, v in vars(args).items() if k in cls.names() and v is not None}
        sets = cls.parse_sets(getattr(args, "_set", None))
        if "dataset" in cls.names() and given.get("dataset"):
            cfg = cls.for_dataset(given.pop("dataset"), **given)
        else:
            cfg = cls(**given).validate()
        return cfg.replace(**sets) if sets else cfg


def load_dataset(cfg: Config, dataset: Any = None) -> Any:
    """The prepared dataset a stage runs on: ``dataset`` when the caller already holds it (it must
    be ``cfg.dataset``: the config is what the result says it ran on), else ``cfg.dataset`` loaded."""
    from . import datasets

    if dataset is None:
        return datasets.load(cfg.dataset)
    if datasets.canonical_name(dataset.name) != cfg.dataset:
        raise ConfigError(f"the {cfg.STAGE} config names dataset {cfg.dataset!r} but was given the loaded "
                          f"dataset {dataset.name!r}: build it with {type(cfg).__name__}.for_dataset"
                          f"({dataset.name!r}, ...)")
    return dataset


class Result:
    """Base of every stage's result: a readable summary, a dict, and a JSON file."""

    def summary(self) -> str:
        """A few readable lines (what the command prints)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (dataclass fields; paths as text)."""
        return _plain(dataclasses.asdict(self)) if dataclasses.is_dataclass(self) else {}

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        from . import atomic

        return atomic.write_json(self.to_dict(), path)

    #: The command's exit status for this result (0: success).
    @property
    def exit_code(self) -> int:
        return 0


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
