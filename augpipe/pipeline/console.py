"""The command line's contract with its caller: exit codes, ``augpipe: ...`` lines on stderr, and signals.

Shared by ``augpipe run`` and the other subcommands (``augpipe evaluate`` included), so every command
exits with the same documented codes (see ``cli``'s module docstring).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import click

EXIT_USAGE, EXIT_FAILURES, EXIT_MODEL, EXIT_INVALID, EXIT_STORAGE = 2, 3, 4, 5, 6
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


def fail(message: str, code: int) -> NoReturn:
    """Print ``augpipe: error: message`` on stderr and exit with ``code``."""
    click.echo(f"augpipe: error: {message}", err=True)
    sys.exit(code)


class _Console(logging.Handler):
    """Engine messages as ``augpipe: ...`` lines on whatever stderr is current (click's, under a test)."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(f"augpipe: {record.getMessage()}", err=True)


def setup_logging(quiet: bool) -> None:
    """INFO and up on the console (warnings only with --quiet); the run's log file takes DEBUG."""
    logger = logging.getLogger("augpipe")
    console = next((h for h in logger.handlers if isinstance(h, _Console)), None)
    if console is None:
        console = _Console()
        logger.addHandler(console)
    console.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[list[int]]:
    """SIGINT/SIGTERM ask the run to stop; the list holds the signal received, if any."""
    received: list[int] = []

    def handle(signum: int, _frame: object) -> None:
        if received:
            raise KeyboardInterrupt
        received.append(signum)
        stop.set()
        click.echo("augpipe: stopping: abandoning shards in flight, keeping finished ones", err=True)

    previous = {sig: signal.signal(sig, handle) for sig in EXIT_SIGNAL}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
