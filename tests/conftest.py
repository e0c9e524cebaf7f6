"""Shared fixtures: one local Ray instance per test session (starting Ray costs seconds), corpora."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=512 * 2**20,
        logging_level="ERROR",
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_text(tmp_path_factory) -> Path:
    from augpipe.pipeline.demo import write_demo_data

    root = tmp_path_factory.mktemp("demo")
    write_demo_data(root)
    return root / "text"


@pytest.fixture()
def silent_port():
    """A loopback port that never answers, like a firewalled or powered-off head: its accept queue is
    full, so the kernel drops new SYNs instead of refusing them."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port), timeout=5)
    yield port
    filler.close()
    server.close()
