"""Errors that the command line reports as one line (no traceback).

Library errors speak the library's language: a bad argument is named by its Python name (``fraction must be in
(0, 1]``) and the error records it (``err.option``). The command line, which knows the flags, prints
:meth:`DagmanError.for_cli`, where the flag takes the name's place (``--fraction must be in (0, 1]``). An argument
named inside a message is written ``<<name>>``: ``str(err)`` shows ``name``, :meth:`~DagmanError.for_cli`
``--name`` (``give either <<labels>> or <<num_classes>>``).
"""

import re
import sys

_NAMED = re.compile(r"<<([a-z][a-z0-9_]*)>>")


def python_text(text: str) -> str:
    """``text`` with every ``<<name>>`` written as the Python argument ``name``."""
    return _NAMED.sub(lambda m: m.group(1), text)


def cli_text(text: str) -> str:
    """``text`` with every ``<<name>>`` written as the flag ``--name`` (underscores as dashes)."""
    return _NAMED.sub(lambda m: "--" + m.group(1).replace("_", "-"), text)


class DagmanError(Exception):
    """A user-facing error: bad input, bad configuration, missing file. The CLI prints :meth:`for_cli` on one
    line and exits with status 2.

    ``option``: the Python name of the argument the message starts with, if any (``crop_size``); ``flag``: its
    command-line flag (default ``--`` + the name with dashes: ``--crop-size``)."""

    def __init__(self, *args, option: str | None = None, flag: str | None = None) -> None:
        super().__init__(*args)
        self.option = option
        self.flag = flag or ("--" + option.replace("_", "-") if option else None)

    def __str__(self) -> str:
        return python_text(super().__str__())

    def for_cli(self) -> str:
        """The message as the command line shows it: argument names replaced by their flags."""
        text = cli_text(super().__str__())
        if self.option and self.flag and text.startswith(self.option):
            return self.flag + text[len(self.option):]
        return text


def run_script(main, argv=None) -> int:
    """A benchmark script's exit status: ``main(argv)``, with a :class:`DagmanError` (a bad cache, config,
    variant) printed as one line on stderr and status 2, as the dagman commands do, instead of a traceback."""
    try:
        return main(argv)
    except DagmanError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


class ConfigError(DagmanError):
    """Invalid configuration: unknown key, wrong type, bad value."""


class DataError(DagmanError):
    """An input image or data set that cannot be used."""
