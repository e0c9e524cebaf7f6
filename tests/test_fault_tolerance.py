"""A lost worker or node does not cost the run: every recovered run writes what an uninterrupted one writes.

Each scenario runs ``augpipe run mixup`` as a user would (a subprocess with its own Ray), with a fault
injected by ``tests.faults``: a stage actor SIGKILLed while busy with a shard, the worker of a read task or
of a commit task SIGKILLed, a shard that kills its worker every time (a poison shard). The node-loss
scenario removes a node of a ``ray.cluster_utils.Cluster`` mid-run. The reference is the same recipe run
uninterrupted with the in-process executor.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from augpipe.pipeline import layout
from augpipe.pipeline.config import load_recipe
from augpipe.pipeline.run import run_recipe
from tests.faults import fault_env

SHARDS, PER_SHARD = 6, 5
SETS = ["multiple=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Six shards of five small labelled images."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(7)
    for shard in range(SHARDS):
        with wds.TarWriter(str(folder / f"shard-{shard:05d}.tar")) as sink:
            for i in range(PER_SHARD):
                pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                label = "warm" if (shard + i) % 2 else "cool"
                sink.write({"__key__": f"img{shard}x{i}", "png": buffer.getvalue(), "json": {"label": label}})
    return folder


@pytest.fixture(scope="module")
def reference_run(images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    result = run_recipe(load_recipe("mixup", sets=SETS), images, out, progress=False, executor="local")
    assert result.ok
    return out


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[str, bytes]:
    return tars(reference_run)


@pytest.fixture(scope="module")
def reference_samples(reference_run) -> dict[str, object]:
    """The uninterrupted run's counts: 30 in, 60 mixed, less the copies that drop_duplicates removed."""
    samples = json.loads((reference_run / layout.MANIFEST).read_text())["samples"]
    assert samples["in"] == SHARDS * PER_SHARD and 0 < samples["out"] <= 2 * SHARDS * PER_SHARD
    return samples


def tars(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def augpipe(out: Path, images: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "augpipe.pipeline.cli", "run", "mixup", "--input", str(images)]
    command += ["--output", str(out), "--quiet", *(arg for s in SETS for arg in ("--set", s))]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize(
    "target",
    ["run", "read_source", "commit_shard"],
    ids=["busy stage actor", "read task worker", "commit task worker"],
)
def test_a_worker_killed_once_costs_nothing(target, images, reference, reference_samples, tmp_path):
    out = tmp_path / "out"
    env = fault_env(tmp_path / "fault", target, "shard-00003", once=True)
    proc = augpipe(out, images, env)
    assert (tmp_path / "fault" / "killed").exists(), "the fault was never injected"
    assert proc.returncode == 0, proc.stderr
    assert tars(out) == reference
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["samples"] == reference_samples and reference_samples["failed"] == 0


def test_a_poison_shard_is_quarantined_and_the_rest_completes(images, reference, tmp_path):
    out = tmp_path / "out"
    proc = augpipe(out, images, fault_env(tmp_path / "fault", "run", "shard-00002", once=False))
    assert proc.returncode == 3, proc.stderr  # 5 of 30 samples failed: over the default 5%
    assert "exceeds --max-failure-rate" in proc.stderr
    assert "worker_crashed" in proc.stderr
    written = tars(out)
    assert "shard-00002.tar" not in written, "a shard with no surviving sample writes no data file"
    assert written == {k: v for k, v in reference.items() if k != "shard-00002.tar"}
    manifest = json.loads((out / layout.MANIFEST).read_text())
    assert manifest["failures"]["by_cause"] == {"worker_crashed": PER_SHARD}
    assert manifest["incomplete_shards"] == {}
    quarantined = [
        json.loads(s["error.json"])
        for s in wds.WebDataset(str(out / layout.quarantine_file("shard-00002")), shardshuffle=False)
    ]
    assert sorted(q["key"] for q in quarantined) == [f"img2x{i}" for i in range(PER_SHARD)]
    assert all("died" in q["message"] and q["stage"] == "mixup" for q in quarantined)


NODE_LOSS = textwrap.dedent(
    """
    import json, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from augpipe.pipeline.config import load_recipe
    from augpipe.pipeline.run import run_recipe

    images, out = Path(sys.argv[1]), Path(sys.argv[2])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2), cluster.add_node(num_cpus=2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    removed = []

    def remove_busy_node():
        stats = out / "_augpipe" / "stats"
        while not (stats.exists() and any(stats.iterdir())):
            time.sleep(0.05)
        actors = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
        busy = {a["Address"]["NodeID"] for a in actors if a["ActorClassName"].endswith("StageRunner")}
        victim = next(n for n in nodes if n.node_id in busy)
        cluster.remove_node(victim)
        removed.append(victim.node_id)

    killer = threading.Thread(target=remove_busy_node, daemon=True)
    killer.start()
    result = run_recipe(load_recipe("mixup", sets=["multiple=2"]), images, out, progress=False)
    killer.join(timeout=60)
    alive = len([n for n in ray.nodes() if n["Alive"]])
    report = {"ok": result.ok, "removed": removed, "nodes": alive, "samples": result.manifest["samples"]}
    print(json.dumps(report))
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_losing_a_node_mid_run_finishes_on_the_others(images, reference, reference_samples, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "node_loss.py"
    script.write_text(NODE_LOSS)
    env = fault_env(tmp_path / "slow", "run", "no-such-shard", once=True, delay=1.0)
    command = [sys.executable, str(script), str(images), str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["removed"], "no node was removed"
    assert report["ok"] and report["nodes"] == 2  # the head and the surviving worker
    assert report["samples"] == reference_samples
    assert tars(out) == reference
