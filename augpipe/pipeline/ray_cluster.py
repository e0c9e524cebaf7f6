"""Joining a Ray cluster and sizing the stage actors to what it has.

Kept apart from the executor's loop because both ``run`` (join, describe, leave) and the executor (fit the
actors beside the light tasks) need it, and neither needs the other's state.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any

import ray

from augpipe.pipeline.execution import log
from augpipe.pipeline.stage import Resources, Stage

TASK_CPUS = 0.25
# Workers never reach a model hub (a missing model is an error, not a download), and print no model
# loading progress bars into the job's log.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TQDM_DISABLE": "1",
}
CLIENT_CONNECT_ATTEMPTS = 3
CLIENT_RETRY_DELAY_S = 5.0


def init_ray(address: str | None) -> bool:
    """Join ``address`` or start a local instance; True when this call started Ray (and must stop it).

    Ray's core worker installs its own SIGINT/SIGTERM handlers (a stack dump, then exit 1); the ones the
    caller had are put back, so a signal stops the run cleanly with its documented exit code.
    """
    if ray.is_initialized():
        return False
    env = {k: v for k, v in WORKER_ENV.items() if k not in os.environ}
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    attempts = CLIENT_CONNECT_ATTEMPTS if (address or "").startswith("ray://") else 1
    for attempt in range(1, attempts + 1):
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                configure_logging=True,
                logging_level="WARNING",
                log_to_driver=True,
                runtime_env={"env_vars": env} if env else None,
            )
            break
        except ConnectionError as error:
            # The head's client proxy starts one server process per client; on a busy head that
            # process can fail to come up, and the next connection usually gets one that does.
            if attempt == attempts:
                raise
            log.warning(
                "joining %s failed (attempt %d of %d): %s; retrying",
                address,
                attempt,
                attempts,
                str(error).strip().splitlines()[-1],
            )
            time.sleep(CLIENT_RETRY_DELAY_S * attempt)
    if threading.current_thread() is threading.main_thread():
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    return True


def shutdown() -> None:
    ray.shutdown()


def describe_cluster() -> dict[str, Any]:
    """Where the run executed, for the manifest: the Ray address, nodes, CPUs and GPUs."""
    resources = ray.cluster_resources()
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # Ray Client connections have no GCS address on the driver side
        address = "ray-client"
    return {
        "executor": "ray",
        "address": address,
        "nodes": sum(1 for node in ray.nodes() if node["Alive"]),
        "cpus": resources.get("CPU", 0.0),
        "gpus": resources.get("GPU", 0.0),
    }


def _largest_node_cpus() -> float:
    return max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"]), default=1.0)


def _floor(cpus: float) -> float:
    """Round a CPU share down to Ray's resolution: rounded up, the actors' shares add up to more than
    the room left, and the read and commit tasks beside them run one at a time instead of two."""
    return math.floor(cpus * 1000) / 1000


def fit_resources(stages: list[Stage]) -> dict[str, Resources]:
    """Each stage's resources, scaled so every actor fits the cluster beside the read and commit tasks.

    A 2-core laptop cannot give five stages a CPU each, nor its memory 8 GiB per diffusion worker; they
    still run, sharing what there is, instead of waiting forever for resources that do not exist (Ray
    would queue those actors silently). No actor asks for more CPUs than the largest node has. GPUs are
    never invented or oversubscribed: a stage that asks for one on a cluster without any runs on CPU when
    its device is ``auto`` and fails when it is ``cuda``, and GPU shares that add up to more than the
    cluster has fail with the numbers.
    """
    cluster = ray.cluster_resources()
    gpus_total = cluster.get("GPU", 0.0)
    wanted = {s.name: s.effective_resources() for s in stages}
    gpu = {name: r.gpus if gpus_total > 0 else 0.0 for name, r in wanted.items()}
    for stage in stages:
        if wanted[stage.name].gpus > 0 and gpus_total == 0:
            if stage.settings.device == "cuda":
                raise RuntimeError(f"stage {stage.name} has device: cuda but the Ray cluster has no GPU")
            log.warning("no GPU in the cluster; %s runs on CPU", stage.name)
    gpus_asked = sum(gpu[s.name] * s.settings.concurrency for s in stages)
    if gpus_asked > gpus_total + 1e-9:
        shares = ", ".join(f"{s.name} {gpu[s.name]} x{s.settings.concurrency}" for s in stages if gpu[s.name])
        raise RuntimeError(
            f"stages ask for {gpus_asked:g} GPUs ({shares}) but the cluster has {gpus_total:g}; "
            "lower their gpus: or concurrency: (e.g. --set caption.gpus=0.25)"
        )

    def scale(asked: float, available: float) -> float:
        return min(1.0, available / asked) if asked > 0 else 1.0

    cpu_scale = scale(
        sum(wanted[s.name].cpus * s.settings.concurrency for s in stages),
        max(cluster.get("CPU", 1.0) - 2 * TASK_CPUS, 0.1),
    )
    node_cpus = max(_largest_node_cpus() - TASK_CPUS, 0.1)
    memory_scale = scale(
        sum(wanted[s.name].memory_gb * s.settings.concurrency for s in stages) * 2**30,
        0.8 * cluster.get("memory", float("inf")),
    )
    return {
        s.name: Resources(
            cpus=_floor(min(wanted[s.name].cpus * cpu_scale, node_cpus)),
            gpus=gpu[s.name],
            memory_gb=wanted[s.name].memory_gb * memory_scale,
        )
        for s in stages
    }
