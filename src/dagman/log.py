"""The library's messages (notices and warnings) go to the ``dagman`` logger; nothing under ``dagman`` prints.

The command line shows them on stderr (:func:`show_messages`, called by ``dagman``'s entry point): each message
is one line, written as it was logged (``dagman pretrain: ...``, ``dagman: warning: ...``). A Python user sees
the warnings without doing anything (Python's last-resort handler prints WARNING and above on stderr when nothing
is configured) and the notices after ``dagman.log.show_messages()`` or with their own ``logging`` configuration
(records propagate to the root logger as usual).
"""

from __future__ import annotations

import logging
import sys

__all__ = ["logger", "show_messages"]

logger = logging.getLogger("dagman")


class _CurrentStderr(logging.Handler):
    """Writes each record's message to whatever ``sys.stderr`` is at that moment (so redirections and test
    capture see it), one line per message, flushed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not turn a message into a crash
            self.handleError(record)


def show_messages(level: int = logging.INFO) -> None:
    """Show the library's messages at ``level`` and above on stderr (idempotent)."""
    if not any(isinstance(h, _CurrentStderr) for h in logger.handlers):
        logger.addHandler(_CurrentStderr())
    logger.setLevel(level)
