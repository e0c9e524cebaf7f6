"""--address: a run joins an existing Ray cluster instead of starting its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from augpipe.pipeline import layout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def cluster():
    """A Ray head in its own process group, stopped by signalling that group alone.

    ``ray stop`` would stop every Ray on the machine, the test session's own instance included.
    """
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    yield f"127.0.0.1:{port}", env
    os.killpg(head.pid, signal.SIGTERM)
    head.wait(timeout=60)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_run_joins_the_cluster_at_address(cluster, demo_text, tmp_path):
    address, env = cluster
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "augpipe.pipeline.cli",
            "run",
            "passthrough",
            "--input",
            str(demo_text),
            "--output",
            str(out),
            "--address",
            address,
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["samples"]["out"] == 24
    port = address.rsplit(":", 1)[1]
    assert manifest["cluster"]["address"].endswith(f":{port}"), "ran on the cluster, not a local Ray"
    assert manifest["cluster"]["cpus"] == 2
