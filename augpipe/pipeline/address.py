"""Where ``--address`` points, checked before Ray starts, so a wrong address fails in seconds.

Given an address where nothing answers, ``ray.init`` retries for minutes and prints only its own
warnings; a nightly job then hangs until someone notices. This module reads the address the way Ray
does (``HOST:PORT`` of the head's GCS, ``ray://HOST:PORT`` of its Ray Client server, ``auto``) and
opens one TCP connection to it with a deadline, so a typo, a stopped head or a closed firewall becomes
a one-line error naming the address. It imports nothing from Ray: only the executor does.

``auto`` follows Ray's documented order, minus its last resort: ``RAY_ADDRESS``, then the file that
``ray start`` writes on the machine it ran on (``$RAY_TMPDIR/ray/ray_current_cluster``, ``/tmp`` by
default). Ray would go on to join any GCS process it finds in ``ps``; on a shared machine that can be
somebody else's cluster, so augpipe stops here and says how to name the cluster instead.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from augpipe.pipeline.config import ConfigError

CLIENT_SCHEME = "ray://"
PROBE_TIMEOUT_S = 10.0
"""How long one connection attempt may take; with name resolution, the check ends within twice this."""

FORMS = "HOST:PORT (the head's GCS, port 6379 by default), ray://HOST:PORT (Ray Client, 10001) or auto"


@dataclass(frozen=True)
class ClusterAddress:
    """An address to hand to ``ray.init``, where it came from, and the endpoint to probe."""

    text: str
    """The address as given (what ``ray.init`` receives)."""
    host: str
    port: int
    source: str
    """``--address``, ``RAY_ADDRESS`` or the current-cluster file it was read from."""

    @property
    def is_client(self) -> bool:
        """True for ``ray://``: the driver stays here and talks to the cluster through its client server."""
        return self.text.startswith(CLIENT_SCHEME)

    def __str__(self) -> str:
        return self.text if self.source == "--address" else f"{self.text} (from {self.source})"


def parse_address(text: str, source: str = "--address") -> ClusterAddress:
    """Split ``HOST:PORT`` or ``ray://HOST:PORT`` into its parts; raise ConfigError naming a bad one."""
    given = text.strip()
    scheme, sep, rest = given.partition("://")
    if not sep:
        rest = given
    elif f"{scheme}://" != CLIENT_SCHEME:
        hint = (
            " (that is the dashboard's Jobs API: submit with `ray job submit --address ...`)"
            if scheme in ("http", "https")
            else ""
        )
        raise ConfigError(f"Ray address {given!r} from {source}: expected {FORMS}{hint}")
    host, colon, port = rest.rstrip("/").rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # [::1]:6379
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"Ray address {given!r} from {source}: expected {FORMS}")
    return ClusterAddress(text=given, host=host, port=int(port), source=source)


def current_cluster_file(environ: Mapping[str, str] = os.environ) -> Path:
    """The file ``ray start`` writes with its GCS address, where ``ray.init`` looks for it."""
    root = environ.get("RAY_TMPDIR") or (environ.get("TMPDIR") if sys.platform.startswith("linux") else None)
    return Path(root or "/tmp") / "ray" / "ray_current_cluster"


def resolve_address(address: str | None, environ: Mapping[str, str] = os.environ) -> ClusterAddress | None:
    """The cluster a run will join, or None when it will start its own Ray.

    Ray itself prefers ``RAY_ADDRESS`` when the address is unset or ``auto``, so that is checked too:
    inside ``ray job submit`` (which sets it) a run without ``--address`` joins the cluster.
    """
    from_env = environ.get("RAY_ADDRESS", "").strip()
    if address is not None and address.strip() != "auto":
        return parse_address(address)
    if from_env:
        return parse_address(from_env, source="RAY_ADDRESS")
    if address is None:
        return None
    marker = current_cluster_file(environ)
    try:
        found = marker.read_text().strip()
    except OSError:
        found = ""
    if not found:
        raise ConfigError(
            f"--address auto: no Ray cluster found (RAY_ADDRESS is unset and {marker} does not exist); "
            "start one on this machine with `ray start --head`, or pass --address HOST:PORT"
        )
    return parse_address(found, source=str(marker))


def _resolve_host(address: ClusterAddress, timeout: float) -> list[tuple]:
    """``getaddrinfo`` with a deadline: a dead DNS server would otherwise block for its own timeouts."""
    result: list[list[tuple] | BaseException] = []

    def lookup() -> None:
        try:
            result.append(socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM))
        except OSError as exc:
            result.append(exc)

    worker = threading.Thread(target=lookup, daemon=True)  # daemon: a stuck lookup never delays exit
    worker.start()
    worker.join(timeout)
    if not result:
        raise ConfigError(f"Ray address {address}: could not resolve {address.host!r} within {timeout:g} s")
    if isinstance(result[0], BaseException):
        raise ConfigError(f"Ray address {address}: unknown host {address.host!r} ({result[0]})")
    return result[0]


def probe(address: ClusterAddress, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Open and close one TCP connection to the address; raise ConfigError if nothing answers in time."""
    errors = []
    for family, kind, proto, _, sockaddr in _resolve_host(address, timeout):
        with socket.socket(family, kind, proto) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(sockaddr)
            except TimeoutError:
                errors.append(f"no answer within {timeout:g} s")
            except OSError as exc:
                errors.append(exc.strerror or str(exc))
            else:
                return
    service = "Ray Client server" if address.is_client else "Ray head (GCS)"
    raise ConfigError(
        f"Ray address {address}: no {service} answers at {address.host}:{address.port} "
        f"({'; '.join(dict.fromkeys(errors))}); is the cluster up, and is this its address?"
    )


def check_address(address: str | None, timeout: float = PROBE_TIMEOUT_S) -> ClusterAddress | None:
    """Resolve ``--address`` (None: start a local Ray unless RAY_ADDRESS says otherwise) and probe it.

    Returns the address the run will join, or None for a local Ray. Raises ConfigError, whose message
    names the address, when it is malformed, cannot be found (``auto``) or does not answer.

    Hand ``ray.init`` the given address, or ``"local"`` when this returns None: ``ray.init(address=None)``
    joins the cluster named in the current-cluster file whenever ``ray start`` ran on this machine.
    """
    resolved = resolve_address(address)
    if resolved is not None:
        probe(resolved, timeout)
    return resolved
