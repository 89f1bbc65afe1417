"""The ``dimkit`` command line: one sub-command per stage, each a thin wrapper over the package."""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys

from .errors import _CLI, DimkitError

#: sub-command -> module: a stage (``CONFIG``, a :class:`dimkit.stage.Config`, and ``run(cfg) -> Result``),
#: or a module exposing ``add_arguments(parser)`` and ``run_cli(args) -> int`` (``info``, ``notebooks``, ...).
#: Modules are imported only when their command runs, so ``dimkit --help`` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("dimkit.prepare", "convert a released dataset into dimkit's prepared form"),
    "candidates": ("dimkit.candidates", "build top-k fuzzy candidate lists (DIM's search_top100)"),
    "images": ("dimkit.images", "check every image of a dataset and report unusable ones"),
    "augment": ("dimkit.augment", "ask an LLM about every entity and write the '+' dataset (Wiki+, Rich+, Diverse+)"),
    "cues": ("dimkit.cues", "ask an image expert (BLIP-2, a VLM, an API, or stored answers) about every mention image"),
    "features": ("dimkit.features", "CLIP features of mentions, sentences, images, cues and entity descriptions"),
    "train": ("dimkit.train", "train and evaluate DIM (paper or released variant) on a dataset"),
    "tables": ("dimkit.tables", "rebuild the paper's tables from the runs, training the missing ones if asked"),
    "figure2": ("dimkit.stats", "Figure 2: what the LLM descriptions of the '+' datasets add to the originals"),
    "errors": ("dimkit.analysis", "where a trained run fails and why: error kinds, and the mentions an ablation "
                                  "gets otherwise (notebook 06)"),
    "link": ("dimkit.link", "link new mentions (sentence, mention, image) with a trained run: top-k KB entities"),
    "info": ("dimkit.cli", "show a prepared dataset's counts and the environment"),
    "notebooks": ("dimkit.notebooks", "execute the numbered notebooks headless (make demo)"),
    "reproduce": ("dimkit.reproduce", "check inputs, then run the whole chain, tables and figure (make reproduce)"),
}


#: OS errors that say the place a command writes to cannot take it: reported as errors, not tracebacks.
_PLACE_ERRORS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                           errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``dimkit info``."""
    parser.add_argument("dataset", nargs="?", help="dataset name (e.g. sample, rich+)")


def run_cli(args: argparse.Namespace) -> int:
    """``dimkit info``: environment and, if named, a dataset's counts."""
    from .env import print_environment
    print_environment()
    if args.dataset:
        from . import datasets
        ds = datasets.load(args.dataset)
        print(f"\n{ds.name} ({ds.root})")
        for k, v in ds.counts().items():
            print(f"{k:>20}: {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dimkit", description="DIM reproduction kit")
    from .env import installed_version
    parser.add_argument("--version", action="version", version=f"dimkit {installed_version('dimkit')}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help) in COMMANDS.items():
        sub.add_parser(name, help=help, description=help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # First pass finds the command; its module then adds its own arguments.
    if not argv or argv[0] not in COMMANDS:
        if not argv:
            parser.print_help()
            return 2
        if not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}")
        parser.parse_args(argv)  # --help / --version exit 0 here; an unknown option exits 2
        parser.error(f"name a command first; choose from {', '.join(COMMANDS)}")
    name = argv[0]
    module_name, help = COMMANDS[name]
    module = importlib.import_module(module_name)
    sub = argparse.ArgumentParser(prog=f"dimkit {name}", description=help)
    config = getattr(module, "CONFIG", None)
    (config or module).add_arguments(sub)
    args = sub.parse_args(argv[1:])
    token = _CLI.set(True)
    try:
        if config is None:  # a command that is not a stage (info, notebooks)
            return int(module.run_cli(args) or 0)
        cfg = config.from_args(args)
        if args._show_config:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        result = module.run(cfg)
        print(result.summary())
        return result.exit_code
    except DimkitError as exc:
        print(f"dimkit {name}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dimkit info | head`: the reader went away, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except OSError as exc:  # a read-only folder, a full disk, a folder where a file was named
        if exc.errno not in _PLACE_ERRORS:
            raise  # anything else is a bug to see with its traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"dimkit {name}: error: {where}{exc.strerror or exc} (what was stored so far is kept)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dimkit {name}: interrupted; what was stored so far is kept", file=sys.stderr)
        return 130
    finally:
        _CLI.reset(token)


if __name__ == "__main__":
    sys.exit(main())
