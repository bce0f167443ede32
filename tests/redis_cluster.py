"""Private Redis servers for the tests: one ``redis-server`` or a real Redis Cluster
(3 primaries, optionally with replicas).

Both run from the ``redis-server``/``redis-cli`` binaries on ``PATH``, on spare loopback
ports, in a temporary directory, and are killed at teardown. When the binaries are
missing, :func:`require_binaries` skips on a laptop and fails in CI (``tests/servers.py``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.servers import unavailable

__all__ = [
    "PrivateRedis",
    "RedisClusterProcess",
    "free_port",
    "require_binaries",
    "running_cluster",
]


def require_binaries() -> None:
    """Skip (laptop) or fail (CI) unless redis-server and redis-cli are installed."""
    for name in ("redis-server", "redis-cli"):
        if shutil.which(name) is None:
            unavailable(name, "not found on PATH (apt-get install redis-server)")


def free_port() -> int:
    """A loopback TCP port nobody listens on (and whose +10000 cluster bus port is free)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair found")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ping(port: int, tls: bool = False) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            if not tls:
                raw.sendall(b"PING\r\n")
                return raw.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # answering = up
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            with ctx.wrap_socket(raw) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class PrivateRedis:
    """One ``redis-server`` we own: AOF with ``appendfsync always``, DEBUG enabled."""

    def __init__(self, directory: Path, *extra: str, tls: tuple[Path, Path] | None = None) -> None:
        self.tls = tls  # (certificate, key): serve TLS only, on self.port
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        if self.tls:
            cert, key = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            ports += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(cert)]
            ports += ["--tls-auth-clients", "no"]
        else:
            ports = ["--port", str(self.port)]
        return [
            "redis-server",
            *ports,
            "--bind", "127.0.0.1",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--enable-debug-command", "yes",
            "--repl-diskless-sync-delay", "0",  # a test replica syncs at once
            "--daemonize", "no",
            "--logfile", str(self.dir / "redis.log"),
            *self.extra,
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart on the same port and data directory) and wait for PING."""
        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"redis-server exited with {code}; see {self.dir / 'redis.log'}")
            if _ping(self.port, tls=self.tls is not None):
                return
            time.sleep(0.02)
        self.kill()  # never leave a half-started server behind
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout} s")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final fsync: what a crash looks like."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        self.kill()

    def __enter__(self) -> PrivateRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterProcess:
    """A real Redis Cluster on spare loopback ports: *primaries* primaries, each with
    *replicas* replicas (default: 3 primaries, no replicas, AOF ``everysec``: the cheap
    cluster of the conformance run; the failover tests ask for replicas, ``always`` and
    a short node timeout)."""

    def __init__(
        self,
        directory: Path,
        primaries: int = 3,
        *,
        replicas: int = 0,
        node_timeout_ms: int = 2000,
        appendfsync: str = "everysec",
    ) -> None:
        self.dir = directory
        self.replicas = replicas
        self.nodes: list[PrivateRedis] = []
        for i in range(primaries * (1 + replicas)):
            node = PrivateRedis(
                directory / f"node{i}",
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                str(node_timeout_ms),
            )
            taken = {n.port for n in self.nodes} | {n.port + 10000 for n in self.nodes}
            while node.port in taken or node.port + 10000 in taken:  # unbound until start
                node.port = free_port()
            node.extra += [
                "--cluster-config-file",
                str(node.dir / "nodes.conf"),
                "--appendfsync",
                appendfsync,
            ]
            self.nodes.append(node)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def node(self, port: int) -> PrivateRedis:
        """The node listening on *port*."""
        return next(n for n in self.nodes if n.port == port)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        cmd = ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
        cmd += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout}\n{out.stderr}")
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running node says ``cluster_state:ok`` and, with replicas,
        every primary has all its replicas attached and in sync."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            running = [n.port for n in self.nodes if n.proc is not None]
            if all(self._state_ok(p) for p in running) and self._replicas_in_sync(running):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not reach cluster_state:ok with its replicas in sync")

    def _replicas_in_sync(self, running: list[int]) -> bool:
        if not self.replicas:
            return True
        primaries = 0
        for port in running:
            info = self.info(port, "replication")
            if info.get("role") == "master":
                primaries += 1
                slaves = [v for k, v in info.items() if k.startswith("slave") and "," in v]
                if len(slaves) < self.replicas or not all("state=online" in s for s in slaves):
                    return False
            elif (
                info.get("master_link_status") != "up" or info.get("master_sync_in_progress") != "0"
            ):
                return False
        return primaries == len(self.nodes) // (1 + self.replicas)

    @staticmethod
    def cli(port: int, *args: str) -> str:
        """Run ``redis-cli -p port args...`` and return its output."""
        out = subprocess.run(
            ["redis-cli", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout

    @classmethod
    def info(cls, port: int, section: str) -> dict[str, str]:
        """``INFO section`` of one node as a dict."""
        pairs = (line.partition(":") for line in cls.cli(port, "info", section).splitlines())
        return {k: v.strip() for k, sep, v in pairs if sep}

    @classmethod
    def _state_ok(cls, port: int) -> bool:
        return "cluster_state:ok" in cls.cli(port, "cluster", "info")

    def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


@contextlib.contextmanager
def running_cluster(directory: Path, **options: Any) -> Iterator[RedisClusterProcess]:
    """Start a cluster (3 primaries; *options* as for :class:`RedisClusterProcess`) for
    the duration of the block."""
    require_binaries()
    cluster = RedisClusterProcess(directory, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
