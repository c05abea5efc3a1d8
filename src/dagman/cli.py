"""The ``dagman`` command line.

Thin by design: each leaf command lives in ``dagman.commands.<name>`` and provides

- ``HELP`` (one line) and optionally ``DESCRIPTION`` (longer text for ``--help``),
- ``add_arguments(parser)``,
- ``run(args) -> int``.

Command modules import heavy libraries inside ``run`` so that ``dagman --help`` stays fast.
Any :class:`dagman.errors.DagmanError` raised by a command is printed as one line and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dagman import __version__
from dagman.errors import DagmanError

# (group, name, module). group None = top-level command.
COMMANDS: list[tuple[str | None, str, str]] = [
    (None, "demo", "dagman.commands.demo"),
    (None, "pretrain", "dagman.commands.pretrain"),
    (None, "attention", "dagman.commands.attention"),
    (None, "diversity", "dagman.commands.diversity"),
    (None, "export", "dagman.commands.export"),
    ("data", "fetch-examples", "dagman.commands.fetch_examples"),
    ("data", "prepare", "dagman.commands.prepare"),
    ("data", "nodules", "dagman.commands.nodules"),
    ("data", "probe", "dagman.commands.probe"),
    (None, "classify", "dagman.commands.classify"),
    (None, "outcome", "dagman.commands.outcome"),
    (None, "segment", "dagman.commands.segment"),
    (None, "cluster", "dagman.commands.cluster"),
    (None, "recognize", "dagman.commands.recognize"),
    (None, "features", "dagman.commands.features"),
]

GROUP_HELP = {"data": "get, convert and prepare CT data (fetch-examples, prepare, nodules, probe)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dagman",
        description="DAGMaN self-supervised pretraining of 3D Swin transformers on CT, and downstream tasks.",
    )
    parser.add_argument("--version", action="version", version=f"dagman {__version__}")
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for group, name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        if group is None:
            holder = top
        else:
            if group not in groups:
                gp = top.add_parser(group, help=GROUP_HELP.get(group), description=GROUP_HELP.get(group))
                groups[group] = gp.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")
                gp.set_defaults(_group_parser=gp)
            holder = groups[group]
        sub = holder.add_parser(
            name,
            help=module.HELP,
            description=getattr(module, "DESCRIPTION", module.HELP),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dagman.log import show_messages

    show_messages()  # the library's notices and warnings on stderr
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may stand anywhere among the options of a command that takes them
    if extra:
        if hasattr(args, "overrides") and all("=" in t and not t.startswith("-") for t in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.parse_args(argv)  # reports the unrecognised arguments the usual way (exit 2)
    run = getattr(args, "_run", None)
    if run is None:
        group_parser = getattr(args, "_group_parser", None)
        (group_parser or parser).print_help()
        return 2
    try:
        return int(run(args) or 0)
    except DagmanError as err:
        print(f"dagman: error: {err.for_cli()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dagman: interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        from dagman.fileio import is_storage_error, write_error

        if not is_storage_error(err):
            raise
        # a write outside atomic_write (an appended log line, ...) hit a full disk or a size limit
        print(f"dagman: error: {write_error(err.filename or 'a file', err)}", file=sys.stderr)
        return 2
