"""The --address pre-flight check: every form Ray documents is read as Ray reads it, and an address
where nothing answers is a one-line error naming it instead of minutes of Ray retrying."""

from __future__ import annotations

import socket

import pytest

from augpipe.pipeline.address import current_cluster_file, parse_address, probe, resolve_address
from augpipe.pipeline.config import ConfigError


@pytest.fixture()
def listening():
    """A loopback port that accepts connections, as a head's GCS does."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture()
def closed_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.parametrize(
    ("text", "host", "port", "client"),
    [
        ("10.0.0.5:6379", "10.0.0.5", 6379, False),
        ("head.cluster.local:6380", "head.cluster.local", 6380, False),
        ("ray://head:10001", "head", 10001, True),
        ("[::1]:6379", "::1", 6379, False),
        ("ray://[fd00::7]:10001/", "fd00::7", 10001, True),
    ],
)
def test_every_documented_form_parses(text, host, port, client):
    address = parse_address(text)
    assert (address.host, address.port, address.is_client, address.text) == (host, port, client, text)


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("head", "HOST:PORT"),
        ("head:sixthree", "HOST:PORT"),
        ("head:70000", "HOST:PORT"),
        ("ray://head", "ray://HOST:PORT"),
        ("http://head:8265", "ray job submit"),
        ("anyscale://prod", "ray://HOST:PORT"),
    ],
)
def test_malformed_addresses_are_config_errors_naming_them(text, hint):
    with pytest.raises(ConfigError) as error:
        parse_address(text)
    assert text in str(error.value) and hint in str(error.value)


def test_an_explicit_address_wins_over_ray_address():
    env = {"RAY_ADDRESS": "ray://elsewhere:10001"}
    assert resolve_address("head:6379", env).text == "head:6379"


@pytest.mark.parametrize("given", [None, "auto"])
def test_ray_address_is_used_when_the_address_is_unset_or_auto(given):
    resolved = resolve_address(given, {"RAY_ADDRESS": "10.1.2.3:6379"})
    assert (resolved.host, resolved.port, resolved.source) == ("10.1.2.3", 6379, "RAY_ADDRESS")
    assert "RAY_ADDRESS" in str(resolved)


def test_no_address_and_no_ray_address_means_a_local_ray():
    assert resolve_address(None, {}) is None


def test_auto_reads_the_file_ray_start_writes(tmp_path):
    env = {"RAY_TMPDIR": str(tmp_path)}
    marker = current_cluster_file(env)
    assert marker == tmp_path / "ray" / "ray_current_cluster"
    marker.parent.mkdir()
    marker.write_text("192.0.2.9:6379")
    resolved = resolve_address("auto", env)
    assert (resolved.host, resolved.port, resolved.source) == ("192.0.2.9", 6379, str(marker))


def test_auto_without_a_cluster_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError) as error:
        resolve_address("auto", {"RAY_TMPDIR": str(tmp_path)})
    message = str(error.value)
    assert "--address auto" in message and str(tmp_path / "ray" / "ray_current_cluster") in message
    assert "ray start --head" in message


def test_probe_accepts_a_listening_port(listening):
    probe(parse_address(f"127.0.0.1:{listening}"), timeout=5)
    probe(parse_address(f"ray://localhost:{listening}"), timeout=5)


def test_a_refused_connection_names_the_address(closed_port):
    with pytest.raises(ConfigError) as error:
        probe(parse_address(f"ray://127.0.0.1:{closed_port}"), timeout=5)
    message = str(error.value)
    assert f"ray://127.0.0.1:{closed_port}" in message and "Ray Client server" in message
    assert "refused" in message.lower()
    assert "\n" not in message


def test_an_address_that_never_answers_fails_at_the_deadline(silent_port):
    with pytest.raises(ConfigError) as error:
        probe(parse_address(f"127.0.0.1:{silent_port}"), timeout=1)
    message = str(error.value)
    assert f"127.0.0.1:{silent_port}" in message and "no answer within 1 s" in message


class RefusingHead:
    """``ray.init`` as a head's client proxy answers when its per-client server fails ``failures`` times."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: list[str] = []

    def __call__(self, address: str, **_options) -> None:
        self.calls.append(address)
        if len(self.calls) <= self.failures:
            raise ConnectionAbortedError(
                "Initialization failure from server:\nStarting Ray client server failed."
            )


@pytest.fixture()
def refusing_head(monkeypatch):
    from augpipe.pipeline import ray_cluster

    def install(failures: int) -> RefusingHead:
        head = RefusingHead(failures)
        monkeypatch.setattr(ray_cluster.ray, "is_initialized", lambda: False)
        monkeypatch.setattr(ray_cluster.ray, "init", head)
        monkeypatch.setattr(ray_cluster, "CLIENT_RETRY_DELAY_S", 0.0)
        return head

    return install


def test_a_client_connection_the_head_fails_to_serve_is_retried(refusing_head, caplog):
    from augpipe.pipeline.ray_cluster import CLIENT_CONNECT_ATTEMPTS, init_ray

    head = refusing_head(CLIENT_CONNECT_ATTEMPTS - 1)
    assert init_ray("ray://head:10001") is True
    assert head.calls == ["ray://head:10001"] * CLIENT_CONNECT_ATTEMPTS
    assert "Starting Ray client server failed" in caplog.text


def test_a_head_that_never_serves_the_client_fails_the_run_after_the_retries(refusing_head):
    from augpipe.pipeline.ray_cluster import CLIENT_CONNECT_ATTEMPTS, init_ray

    head = refusing_head(CLIENT_CONNECT_ATTEMPTS)
    with pytest.raises(ConnectionAbortedError):
        init_ray("ray://head:10001")
    assert len(head.calls) == CLIENT_CONNECT_ATTEMPTS


def test_a_gcs_address_is_not_retried(refusing_head):
    """A GCS address that refuses is a configuration fault, which the pre-flight probe has already named."""
    from augpipe.pipeline.ray_cluster import init_ray

    head = refusing_head(1)
    with pytest.raises(ConnectionAbortedError):
        init_ray("10.0.0.5:6379")
    assert head.calls == ["10.0.0.5:6379"]
