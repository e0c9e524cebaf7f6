"""Fault injection for tests: make a worker process die (SIGKILL itself) at a chosen point.

The injection is a ``sitecustomize`` module on PYTHONPATH, so it is active in the test's subprocess and in
every Ray worker that process starts, and absent from augpipe's own code. When ``augpipe.pipeline.worker``
is imported it wraps one function or method; the wrapper kills its own process when it meets the chosen
shard, once (a marker file records the kill) or every time (a poison shard).
"""

from __future__ import annotations

import os
from pathlib import Path

SITECUSTOMIZE = """
import importlib.abc, importlib.util, os, signal, sys

TARGET = os.environ["AUGPIPE_FAULT_TARGET"]        # run | read_source | commit_shard
SHARD = os.environ["AUGPIPE_FAULT_SHARD"]
MARKER = os.environ.get("AUGPIPE_FAULT_MARKER")    # set: die once; unset: die every time
DELAY = float(os.environ.get("AUGPIPE_FAULT_DELAY", "0"))  # seconds every call waits first
HOLD = set(filter(None, os.environ.get("AUGPIPE_FAULT_HOLD", "").split(",")))  # shards that never pass


def _hold_forever():
    # Block until the test kills the run, in ray.get on a task that never ends: Ray hands a task blocked
    # there its CPU back, so a held call does not starve the calls of the shards that go on.
    import time

    import ray

    forever = ray.remote(num_cpus=0)(lambda: time.sleep(10**6))
    ray.get(forever.remote())


def _die_for(shard_id):
    import time

    if DELAY:
        time.sleep(DELAY)
    if shard_id in HOLD:
        _hold_forever()
    if shard_id != SHARD:
        return
    if MARKER:
        try:
            fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def _patch(module):
    if TARGET == "run":
        original = module.StageRunner.run

        def run(self, shard_id, rows, history):
            _die_for(shard_id)
            return original(self, shard_id, rows, history)

        module.StageRunner.run = run
    else:
        original = getattr(module, TARGET)

        def wrapped(*args, **kwargs):
            _die_for(args[1].shard_id if TARGET == "commit_shard" else args[0].shard_id)
            return original(*args, **kwargs)

        wrapped.__module__, wrapped.__qualname__ = module.__name__, TARGET
        setattr(module, TARGET, wrapped)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "augpipe.pipeline.worker":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        loader = spec.loader
        exec_module = loader.exec_module

        def patched_exec(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = patched_exec
        return spec


sys.meta_path.insert(0, _Finder())
"""


def fault_env(
    folder: Path, target: str, shard: str, once: bool, delay: float = 0.0, hold: tuple[str, ...] = ()
) -> dict[str, str]:
    """Environment for a subprocess whose workers die in ``target`` on ``shard`` (once, or always).

    ``delay`` slows every call of ``target`` down, so that a fault from outside lands mid-run; calls for the
    shards in ``hold`` never return, so a test that kills the run knows exactly which shards were done.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
        "AUGPIPE_FAULT_TARGET": target,
        "AUGPIPE_FAULT_SHARD": shard,
        "RAY_AUTH_MODE": "disabled",
        "AUGPIPE_FAULT_DELAY": str(delay),
        "AUGPIPE_FAULT_HOLD": ",".join(hold),
    }
    if once:
        env["AUGPIPE_FAULT_MARKER"] = str(folder / "killed")
    return env
