"""One run at a time per output folder: a lock file naming its holder, with stale locks detected.

Two runs writing one corpus would delete each other's temporary files and interleave shards of two
configurations. The lock (``_augpipe/lock``) records the holder's host, PID, run id and start time; a
second run refuses, naming the holder. A lock left by a run on this host whose process is gone is stale
and taken over with a warning; one held on another host can only be judged by a person, so the message
says how to remove it.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from augpipe.pipeline import layout
from augpipe.pipeline.config import ConfigError
from augpipe.pipeline.execution import log
from augpipe.pipeline.storage import Store


class LockHeld(ConfigError):
    """Another run holds the output folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class OutputLock:
    """The held lock of an output folder; release it when the run ends."""

    store: Store
    run_id: str

    @classmethod
    def acquire(cls, store: Store, run_id: str) -> OutputLock:
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "run_id": run_id,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        blob = json.dumps(record).encode()
        if store.create_exclusive(layout.LOCK, blob):
            return cls(store, run_id)
        holder = _holder(store)
        if holder and holder.get("host") == record["host"] and not _alive(int(holder.get("pid", -1))):
            log.warning(
                "taking over a stale lock of run %s (pid %s on %s is gone)",
                holder.get("run_id"),
                holder.get("pid"),
                holder.get("host"),
            )
            store.write_bytes(layout.LOCK, blob)
            return cls(store, run_id)
        who = "another run"
        if holder:
            who = (
                f"run {holder.get('run_id')} (pid {holder.get('pid')} on {holder.get('host')}, "
                f"since {holder.get('started')})"
            )
        raise LockHeld(
            f"{store.display()} is in use by {who}; wait for it to finish, or if it is gone, "
            f"delete {store.display(layout.LOCK)}"
        )

    def release(self) -> None:
        holder = _holder(self.store)
        if holder is None or holder.get("run_id") == self.run_id:
            self.store.delete(layout.LOCK)


def _holder(store: Store) -> dict[str, Any] | None:
    try:
        return json.loads(store.read_bytes(layout.LOCK))
    except (FileNotFoundError, OSError, json.JSONDecodeError):
        return None
