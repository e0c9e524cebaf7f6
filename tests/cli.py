"""Driving the command line as a user does: in-process for speed, or as a subprocess for signals."""

from __future__ import annotations

import os
import subprocess
import sys

from click.testing import CliRunner

from augpipe.pipeline.cli import main


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and everything the command printed (stdout and stderr)."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes else "")


def augpipe(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    """``augpipe ARGS`` in a subprocess, as a user runs it (``env``: variables added to ours)."""
    env = {**os.environ, **(env or {}), "RAY_AUTH_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "augpipe.pipeline.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        **kwargs,  # type: ignore[arg-type]
    )
