"""--address: a run joins an existing Ray cluster instead of starting its own."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture()
def cluster():
    ray = shutil.which("ray", path=str(Path(sys.executable).parent))
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(
        [
            ray,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    yield f"127.0.0.1:{port}", env
    subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)
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
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples"]["out"] == 24
    port = address.rsplit(":", 1)[1]
    assert manifest["cluster"]["address"].endswith(f":{port}"), "ran on the cluster, not a local Ray"
    assert manifest["cluster"]["cpus"] == 2
