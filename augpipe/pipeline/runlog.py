"""The run's full log (tracebacks included) under ``_augpipe/logs/``, for local outputs.

The log lives on the disk the run writes to, so a full disk reaches it too. Then the file stops and the
console says so once; without this, logging prints its own traceback for every later line and the last
flush on close raises, turning a run that stopped cleanly (exit 6) into a crash.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from augpipe.pipeline import layout
from augpipe.pipeline.execution import log
from augpipe.pipeline.storage import Store


class RunLogHandler(logging.FileHandler):
    """A log file that gives up quietly (after one warning on the console) when it cannot be written."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failed = True
        error = sys.exc_info()[1]
        log.warning("the run log %s is no longer written: %s", self.baseFilename, error)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            super().close()


def open_run_log(store: Store, run_id: str) -> logging.Handler | None:
    """Start copying augpipe's log, at every level, into the run's log file (None for remote outputs)."""
    if store.remote:
        return None
    path = store.local_path(f"{layout.LOGS_DIR}/{run_id}.log")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = RunLogHandler(str(path))
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    return handler


def close_run_log(handler: logging.Handler | None) -> None:
    if handler is not None:
        log.removeHandler(handler)
        handler.close()
