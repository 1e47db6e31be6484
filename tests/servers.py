"""Private Redis, PostgreSQL and NATS servers on free ports, for tests that stop or break
them.

The shared servers (127.0.0.1:6379, :5432 and :4222) are never restarted or killed by a
test;
tests that need an outage start one of these instead. Both can be stopped and started
again on the same port, and always stop when the test ends.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TypeVar

__all__ = [
    "NatsServer",
    "PostgresServer",
    "RedisClusterDeployment",
    "RedisServer",
    "SentinelDeployment",
    "free_port",
    "wait_for_port",
]


_Self = TypeVar("_Self", bound="_ServerProcess")
_D = TypeVar("_D", bound="_Deployment")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    """Block until something accepts connections on ``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


class _ServerProcess:
    """A server run as a child process in a temporary directory of its own: killed to
    stop it, started again on the same port, removed with its directory at the end."""

    def __init__(self, port: int | None, prefix: str) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Kill the server at once (SIGKILL): clients see their connections drop."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self: _Self) -> _Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer(_ServerProcess):
    """A throwaway ``redis-server`` on a free port, nothing kept on disk."""

    def __init__(self, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        super().__init__(port, "crossws-redis-")
        self.extra = extra  # more command-line options (--replicaof ...)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--daemonize",
                "no",
                "--logfile",
                str(self.dir / "redis.log"),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)


class _Sentinel(_ServerProcess):
    """One ``redis-server --sentinel`` watching ``master``."""

    def __init__(self, master_name: str, master_port: int) -> None:
        super().__init__(None, "crossws-sentinel-")
        conf = self.dir / "sentinel.conf"
        # Quick to notice and to fail over: tests wait for it.
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {master_name} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {master_name} 1000\n"
            f"sentinel failover-timeout {master_name} 4000\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )
        self.conf = conf

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        with (self.dir / "sentinel.log").open("ab") as log:
            self.process = subprocess.Popen(
                [binary, str(self.conf), "--sentinel"], stdout=log, stderr=subprocess.STDOUT
            )
        wait_for_port(self.port)


class _Deployment:
    """Several servers started together: closed again if starting fails half-way."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _D) -> _D:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SentinelDeployment(_Deployment):
    """A master, a replica and three sentinels (quorum 2), every one on a free port.

    ``kill_master()`` kills the current master's process; the sentinels promote the
    replica about two seconds later (``wait_for_new_master``).
    """

    MASTER_NAME = "crossws-test"

    def __init__(self) -> None:
        self.servers = [RedisServer()]
        self.servers.append(
            RedisServer(extra=("--replicaof", "127.0.0.1", str(self.servers[0].port)))
        )
        self.sentinels = [_Sentinel(self.MASTER_NAME, self.servers[0].port) for _ in range(3)]

    @property
    def addresses(self) -> list[str]:
        """The sentinels, as the driver's ``sentinels`` option takes them."""
        return [f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels]

    def _ask(self, *command: str) -> object:
        import redis

        for sentinel in self.sentinels:
            if sentinel.process is None:
                continue
            try:
                with redis.Redis(port=sentinel.port, socket_timeout=1) as client:
                    return client.execute_command(*command)
            except redis.RedisError:
                continue
        return None

    def master_port(self) -> int | None:
        answer = self._ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.MASTER_NAME)
        if isinstance(answer, (list, tuple)) and len(answer) == 2:
            return int(answer[1])
        return None

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in self.servers if server.port == port)

    def start(self) -> None:
        for server in self.servers:
            server.start()
        for sentinel in self.sentinels:
            sentinel.start()
        self._wait_until_watched()

    def _wait_until_watched(self, timeout: float = 30.0) -> None:
        """Until every sentinel knows the replica and the other two sentinels: only then
        can they agree on a failover."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = 0
            for sentinel in self.sentinels:
                try:
                    with redis.Redis(port=sentinel.port, socket_timeout=1) as client:
                        replicas = client.execute_command("SENTINEL", "REPLICAS", self.MASTER_NAME)
                        peers = client.execute_command("SENTINEL", "SENTINELS", self.MASTER_NAME)
                except redis.RedisError:
                    continue
                if len(replicas) >= 1 and len(peers) >= 2:
                    ready += 1
            if ready == len(self.sentinels):
                return
            time.sleep(0.1)
        raise TimeoutError("the sentinels did not discover each other and the replica")

    def kill_master(self) -> int:
        """Kill the current master; return its port."""
        port = self.master_port()
        assert port is not None, "no master known to the sentinels"
        self.server_on(port).stop()
        return port

    def wait_for_new_master(self, old: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            port = self.master_port()
            if port is not None and port != old:
                return port
            time.sleep(0.05)
        raise TimeoutError("the sentinels promoted no new master")

    def close(self) -> None:
        for process in [*self.sentinels, *self.servers]:
            process.close()


class NatsServer(_ServerProcess):
    """A throwaway ``nats-server`` with JetStream on a free port, its store in a temporary
    directory (kept across restarts, as a real server's is). ``config`` is appended to its
    configuration file (``max_payload: 65536``, a cluster block, ...)."""

    def __init__(self, port: int | None = None, config: str = "") -> None:
        super().__init__(port, "crossws-nats-")
        self.config = config

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server") or "/usr/sbin/nats-server"
        if not os.path.exists(binary):
            raise RuntimeError("nats-server is not installed")
        conf = self.dir / "server.conf"
        conf.write_text(
            f"host: 127.0.0.1\nport: {self.port}\n"
            f'jetstream {{ store_dir: "{self.dir / "store"}" }}\n{self.config}\n'
        )
        with (self.dir / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT
            )
        # JetStream reads its store before listening: slow on a loaded machine.
        wait_for_port(self.port, timeout=30.0)


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not candidates:
        raise RuntimeError(f"PostgreSQL's {name} is not installed")
    return candidates[-1]


class PostgresServer:
    """A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``) on a free port.

    PostgreSQL refuses to run as root; when the tests run as root the server runs as the
    ``postgres`` user. Authentication is ``trust``, the superuser is ``postgres``.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="crossws-pg-"))
        self.data = self.dir / "data"
        self._initialized = False

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = list(args)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def start(self) -> None:
        if not self._initialized:
            self._run(_pg_bin("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres")
            self._initialized = True
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "log"),
            "-w",
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )
        wait_for_port(self.port)

    def stop(self, mode: str = "immediate") -> None:
        """Stop the server; ``immediate`` drops every client at once."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, downtime: float = 0.0) -> None:
        self.stop()
        time.sleep(downtime)
        self.start()

    def close(self) -> None:
        if self._initialized:
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class RedisClusterDeployment(_Deployment):
    """A Redis Cluster of ``masters`` primaries, each with ``replicas`` replicas, on free
    ports (``cluster-node-timeout`` 1 s, so that a killed primary's replica takes over
    within seconds)."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        options = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
            # A replica takes over however long ago it last heard its primary.
            "--cluster-replica-validity-factor", "0",
        )  # fmt: skip
        self.replicas = replicas
        self.servers = [
            RedisServer(_cluster_port(), extra=options) for _ in range(masters * (1 + replicas))
        ]

    @property
    def url(self) -> str:
        """One node's URL: the driver finds the others."""
        return self.servers[0].url

    def start(self) -> None:
        for server in self.servers:
            server.start()
        binary = shutil.which("redis-cli")
        if binary is None:
            raise RuntimeError("redis-cli is not installed")
        addresses = [f"127.0.0.1:{server.port}" for server in self.servers]
        subprocess.run(
            [binary, "--cluster", "create", *addresses, "--cluster-replicas",
             str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        self.wait_until_healthy()

    def _info(self, server: RedisServer) -> dict[str, str]:
        import redis

        with redis.Redis(port=server.port, socket_timeout=1) as client:
            text = client.execute_command("CLUSTER", "INFO")
        if isinstance(text, bytes):
            text = text.decode()
        return dict(line.split(":", 1) for line in str(text).split() if ":" in line)

    def wait_until_healthy(self, timeout: float = 60.0) -> None:
        """Until every live node says the cluster is ok and every slot is served."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                infos = [self._info(s) for s in self.servers if s.process is not None]
            except redis.RedisError:
                infos = []
            if infos and all(
                i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
                for i in infos
            ):
                return
            time.sleep(0.1)
        raise TimeoutError("the cluster did not become healthy")

    def wait_for_takeover(self, dead: int, timeout: float = 30.0) -> None:
        """Until a replica serves the slots of the primary on port ``dead``."""
        import redis

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for server in self.servers:
                if server.process is None:
                    continue
                try:
                    with redis.Redis(port=server.port, socket_timeout=1) as client:
                        ports = {int(e[2][1]) for e in client.execute_command("CLUSTER", "SLOTS")}
                except redis.RedisError:
                    continue
                if dead not in ports:
                    return
                break
            time.sleep(0.05)
        raise TimeoutError(f"no replica took over from the primary on port {dead}")

    def primary_for(self, key: str) -> RedisServer:
        """The server that owns ``key``'s slot now."""
        import redis

        for server in self.servers:
            if server.process is None:
                continue
            try:
                with redis.Redis(port=server.port, socket_timeout=1) as client:
                    slot = client.execute_command("CLUSTER", "KEYSLOT", key)
                    for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                        if start <= slot <= end:
                            port = int(primary[1])
                            return next(s for s in self.servers if s.port == port)
            except redis.RedisError:
                continue
        raise RuntimeError(f"no node owns {key!r}")

    def close(self) -> None:
        for server in self.servers:
            server.close()
