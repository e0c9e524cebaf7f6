"""Joining a Ray cluster every way Ray documents, and submitting augpipe to it as a Ray job.

One real head per module (``ray start --head`` on loopback, with its dashboard and Ray Client server
on free ports) in its own process group, stopped by signalling that group alone: ``ray stop`` would
stop every Ray on the machine, other people's included. ``RAY_TMPDIR`` gives the head a private temp
folder, so ``--address auto`` finds this head and no other.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from augpipe.pipeline.manifest import read_manifest
from tests.checkout import LOCAL_ONLY, SOURCES, copy_checkout

VENV_BIN = Path(sys.executable).parent
CLI = [sys.executable, "-m", "augpipe.pipeline.cli"]
ADDRESS_CHECK_DEADLINE_S = 30  # the documented bound on failing for an address where nothing answers


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass(frozen=True)
class Head:
    gcs: str
    client: str
    dashboard: str
    env: dict[str, str]
    temp_root: Path

    @property
    def gcs_port(self) -> str:
        return self.gcs.rsplit(":", 1)[1]


def ray_env(temp_root: Path) -> dict[str, str]:
    """This session's environment, with Ray's temp folder private and no inherited cluster address."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="disabled",
        RAY_TMPDIR=str(temp_root),
        # A job's entrypoint runs with the head's PATH: `augpipe` must be on it, as in the image.
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def wait_until_ready(head: subprocess.Popen, dashboard: str, ports: list[int], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if head.poll() is not None:
            pytest.fail(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        if all(answers(port) for port in ports):
            try:
                with urllib.request.urlopen(f"{dashboard}/api/version", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
        time.sleep(0.5)
    pytest.fail(f"the Ray head did not come up within 180 s:\n{log.read_text()[-3000:]}")


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the head's process group; SIGKILL what is left after a minute."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def head():
    temp_root = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # Ray's socket paths must stay short
    env = ray_env(temp_root)
    gcs, dashboard, client, agent = (free_port() for _ in range(4))
    log = temp_root / "head.log"
    with log.open("w") as sink:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "ray"),
                "start",
                "--head",
                "--block",
                f"--port={gcs}",
                "--num-cpus=2",
                "--node-ip-address=127.0.0.1",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--dashboard-agent-listen-port={agent}",
                "--disable-usage-stats",
            ],
            # Ray Client starts one server process per client and gives it 30 s to come up; a busy
            # 2-core machine can take longer to import Ray there.
            env={**env, "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "180"},
            cwd=temp_root,
            start_new_session=True,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_ready(process, f"http://127.0.0.1:{dashboard}", [gcs, client, dashboard], log)
        yield Head(
            gcs=f"127.0.0.1:{gcs}",
            client=f"ray://127.0.0.1:{client}",
            dashboard=f"http://127.0.0.1:{dashboard}",
            env=env,
            temp_root=temp_root,
        )
    finally:
        stop_group(process)
        shutil.rmtree(temp_root, ignore_errors=True)


def head_logs(head: Head) -> str:
    """The tails of the head's error logs, for a failure message (the folder goes with the fixture)."""
    folder = head.temp_root / "ray/session_latest/logs"
    logs = sorted([*folder.glob("*.err"), *folder.glob("ray_client_server*.out")])
    return "".join(f"\n--- {log.name}\n{log.read_text(errors='replace')[-1500:]}" for log in logs)


def run_passthrough(
    demo_text: Path, out: Path, address: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """``augpipe run passthrough`` joining ``address``, as a user types it."""
    command = [
        *CLI,
        "run",
        "passthrough",
        "--input",
        str(demo_text),
        "--output",
        str(out),
        "--address",
        address,
    ]
    return subprocess.run([*command, "--quiet"], capture_output=True, text=True, env=env, timeout=timeout)


def assert_ran_on(head: Head, out: Path) -> None:
    manifest = read_manifest(out)
    assert manifest["samples"]["out"] == 24
    assert manifest["cluster"]["address"].endswith(f":{head.gcs_port}"), "ran on the cluster, not a local Ray"
    assert manifest["cluster"]["cpus"] == 2


@pytest.mark.parametrize("form", ["host:port", "ray://", "auto"])
def test_run_joins_the_cluster_every_documented_way(head, demo_text, tmp_path, form):
    address = {"host:port": head.gcs, "ray://": head.client, "auto": "auto"}[form]
    out = tmp_path / "out"
    proc = run_passthrough(demo_text, out, address, head.env)
    assert proc.returncode == 0, proc.stderr + head_logs(head)
    assert_ran_on(head, out)


def test_a_run_without_address_starts_its_own_ray_even_on_a_cluster_node(head, demo_text, tmp_path):
    """``ray.init()`` alone would join the cluster that ``ray start`` last started on this machine."""
    out = tmp_path / "out"
    command = [*CLI, "run", "passthrough", "--input", str(demo_text), "--output", str(out), "--quiet"]
    proc = subprocess.run(command, capture_output=True, text=True, env=head.env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not read_manifest(out)["cluster"]["address"].endswith(f":{head.gcs_port}")


def submit(head: Head, working_dir: Path, *entrypoint: str) -> subprocess.CompletedProcess:
    ray = str(VENV_BIN / "ray")
    command = [ray, "job", "submit", "--address", head.dashboard, "--working-dir", str(working_dir), "--"]
    return subprocess.run([*command, *entrypoint], capture_output=True, text=True, env=head.env, timeout=300)


def uploaded_package(head: Head, submit_output: str) -> Path:
    """Where the head unpacked the working directory that this submission uploaded."""
    package = re.search(r"gcs://(_ray_pkg_[0-9a-f]+)\.zip", submit_output)
    assert package, submit_output
    unpacked = head.temp_root.glob(f"ray/session_*/runtime_resources/working_dir_files/{package[1]}")
    return next(unpacked)


def test_ray_job_submit_runs_the_checkout_on_the_head(head, demo_text, tmp_path):
    checkout = copy_checkout(tmp_path / "checkout")
    recipe = (checkout / "configs/recipes/passthrough.yaml").read_text()
    nightly = recipe.replace("name: passthrough", "name: nightly-copy").replace("tag: pt", "tag: nc")
    (checkout / "configs/recipes/nightly-copy.yaml").write_text(nightly)  # exists only in this checkout
    out = tmp_path / "corpus"
    proc = submit(
        head,
        checkout,
        *("augpipe", "run", "nightly-copy", "--input", str(demo_text), "--output", str(out)),
        *("--address", "auto", "--incremental", "--quiet"),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "succeeded" in output and "24 samples in, 24 out" in output
    assert_ran_on(head, out)
    assert read_manifest(out)["recipe"] == "nightly-copy", "the job ran the uploaded checkout's configs"
    package = uploaded_package(head, output)
    assert [path for path in SOURCES if (package / path).is_file()] == SOURCES
    assert [path for path in LOCAL_ONLY if (package / path).exists()] == []


def test_a_failing_job_makes_ray_job_submit_fail(head, demo_text, tmp_path):
    proc = submit(
        head,
        copy_checkout(tmp_path / "checkout"),
        *("augpipe", "run", "no-such-recipe", "--input", str(demo_text), "--output", str(tmp_path / "o")),
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "failed" in output and "no-such-recipe" in output


@pytest.mark.parametrize("form", ["host:port refused", "ray:// refused", "host:port silent", "auto"])
def test_an_address_where_nothing_answers_exits_2_naming_it(demo_text, tmp_path, silent_port, form):
    env = ray_env(tmp_path)  # an empty Ray temp folder: no current cluster for `auto` to find
    closed = free_port()
    address = {
        "host:port refused": f"127.0.0.1:{closed}",
        "ray:// refused": f"ray://127.0.0.1:{closed}",
        "host:port silent": f"127.0.0.1:{silent_port}",
        "auto": "auto",
    }[form]
    proc = run_passthrough(demo_text, tmp_path / "out", address, env, timeout=ADDRESS_CHECK_DEADLINE_S)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("augpipe: error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(errors) == 1 and address in errors[0], proc.stderr
