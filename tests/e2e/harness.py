"""End-to-end harness: real server processes serving testproject, and real clients.

- :func:`project_env` builds the environment of a testproject process: the driver and
  its options, a cluster ``channel`` unique to the call unless given.
- :class:`Processes` starts ``daphne`` servers (:meth:`Processes.daphne`, or several at
  once with :meth:`Processes.daphnes`) and ``manage.py runworker`` processes
  (:meth:`Processes.runworker`), waits (bounded) until each is ready and stops them all
  on exit: SIGTERM, then SIGKILL after a bound. Output goes to a log file per process;
  :meth:`Processes.report` gathers them for failure messages.
- :class:`WSClient` is a small JSON WebSocket client (the ``websockets`` library) whose
  every wait is bounded; :func:`http_get` and :func:`http_post` do the same for HTTP.

Every address is on 127.0.0.1 and proxies from the environment are ignored.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.version import version as websockets_version

from tests.servers import free_port, wait_for_port

__all__ = [
    "HOST",
    "JOBS_CHANNEL",
    "ROOT",
    "DaphneServer",
    "HttpResult",
    "ManagedProcess",
    "ProcessFailed",
    "Processes",
    "WSClient",
    "http_get",
    "http_post",
    "project_env",
]

ROOT = Path(__file__).resolve().parents[2]
MANAGE_PY = ROOT / "testproject" / "manage.py"
HOST = "127.0.0.1"
JOBS_CHANNEL = "chat-jobs"

START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
PORT_ATTEMPTS = 3
RECEIVE_TIMEOUT = 5.0
TRACEBACK = "Traceback (most recent call last)"


# -- environment ------------------------------------------------------------------------


def project_env(
    driver: str = "local",
    *,
    channel: str | None = None,
    redis_url: str | None = None,
    pg_dsn: str | None = None,
    options: Mapping[str, Any] | None = None,
    embedded_worker: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a testproject process using ``driver``.

    Processes started with the same returned mapping form one cluster: ``channel``
    defaults to a name unique to this call, so tests never bridge into each other on a
    shared Redis or PostgreSQL. ``embedded_worker`` makes a server process also run the
    ``chat-jobs`` worker (needed with ``local``, which does not span processes).
    ``CROSSWS_*`` and ``TESTPROJECT_*`` variables of this process are not inherited (but
    ``CROSSWS_REQUIRE_SERVICES``): pass ``redis_url``/``pg_dsn`` from the conftest fixtures.
    """
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CROSSWS_", "TESTPROJECT_")) or key == "CROSSWS_REQUIRE_SERVICES"
    }
    pythonpath = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": "testproject.settings",
            "CROSSWS_DRIVER": driver,
            "CROSSWS_CHANNEL": channel or f"e2e-{uuid.uuid4().hex[:12]}",
        }
    )
    if redis_url is not None:
        env["CROSSWS_REDIS_URL"] = redis_url
    if pg_dsn is not None:
        env["CROSSWS_PG_DSN"] = pg_dsn
    if options:
        env["CROSSWS_OPTIONS"] = json.dumps(dict(options))
    if embedded_worker:
        env["TESTPROJECT_EMBEDDED_WORKER"] = "1"
    env.update(extra or {})
    return env


# -- processes --------------------------------------------------------------------------


class ProcessFailed(RuntimeError):
    """A process did not start, or died; the message holds its output."""


class ManagedProcess:
    """A child process whose output (stdout and stderr) goes to a log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_dir: Path) -> None:
        self.name = name
        self.args = args
        self.env = dict(env)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self._terminated = False
        try:
            self.process = subprocess.Popen(
                args,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self._log.close()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        """Everything the process wrote so far."""
        return self.log_path.read_text(errors="replace")

    def describe(self) -> str:
        status = "running" if self.alive else f"exited with {self.process.returncode}"
        return f"{self.name} (pid {self.pid}, {status})"

    def fail(self, why: str) -> ProcessFailed:
        """A :class:`ProcessFailed` saying ``why``, with this process's output."""
        return ProcessFailed(f"{self.describe()}: {why}\n--- output ---\n{self.output()}")

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll ``ready`` until true; raise with the output if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive:
                raise self.fail(f"exited while waiting for {what}")
            if time.monotonic() > deadline:
                raise self.fail(f"no {what} after {timeout}s")
            time.sleep(0.05)

    def wait_for_output(self, text: str, timeout: float = START_TIMEOUT) -> None:
        """Wait until the process has written ``text``."""
        self.wait_until(lambda: text in self.output(), repr(text), timeout)

    def signal(self, signum: int) -> None:
        """Send ``signum`` (e.g. ``signal.SIGSTOP``) if the process still runs."""
        if self.alive:
            self.process.send_signal(signum)

    def terminate(self) -> None:
        """Ask the process to stop (SIGTERM, once) without waiting."""
        if self.alive and not self._terminated:
            self._terminated = True
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit code."""
        if self.alive:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        if self.alive:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)


class DaphneServer(ManagedProcess):
    """``daphne testproject.asgi:application`` listening on 127.0.0.1:``port``."""

    def __init__(self, name: str, port: int, env: Mapping[str, str], log_dir: Path) -> None:
        self.port = port
        args = [
            sys.executable,
            "-m",
            "daphne",
            "-b",
            HOST,
            "-p",
            str(port),
            "testproject.asgi:application",
        ]
        super().__init__(name, args, env, log_dir)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def url(self, path: str = "/") -> str:
        return f"http://{self.address}{path}"

    def ws_url(self, path: str) -> str:
        return f"ws://{self.address}{path}"

    def room_url(self, room: str) -> str:
        """The WebSocket URL of a chat room."""
        return self.ws_url(f"/ws/chat/{room}/")

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until daphne listens (it loads the application first).

        Daphne's own log line is the signal, not a connection to the port: a daphne that
        can't bind keeps running, and the port may belong to another process.
        """
        listening = f"Listening on TCP address {self.address}"

        def settled() -> bool:
            output = self.output()
            return listening in output or "Listen failure" in output

        self.wait_until(settled, f"listener on {self.address}", timeout)
        if listening not in self.output():
            error = self.fail("could not listen")
            self.kill()
            raise error
        wait_for_port(self.port, timeout=timeout)


class Processes:
    """Starts testproject processes and stops every one of them on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[ManagedProcess] = []
        self._names: set[str] = set()

    def _name(self, base: str) -> str:
        name, n = base, 1
        while name in self._names:
            n += 1
            name = f"{base}-{n}"
        self._names.add(name)
        return name

    def daphne(
        self, env: Mapping[str, str], *, port: int | None = None, name: str = "daphne"
    ) -> DaphneServer:
        """Start one daphne server and wait until it accepts connections."""
        (server,) = self.daphnes(1, env, ports=None if port is None else [port], name=name)
        return server

    def daphnes(
        self,
        count: int,
        env: Mapping[str, str],
        *,
        ports: Iterable[int] | None = None,
        name: str = "daphne",
    ) -> list[DaphneServer]:
        """Start ``count`` daphne servers at once (one cluster if ``env`` is shared), each
        on its own port, and wait until all accept connections."""
        chosen = list(ports) if ports is not None else [free_port() for _ in range(count)]
        if len(chosen) != count:
            raise ValueError(f"{count} servers need {count} ports, got {chosen}")
        servers = [self._start_daphne(name, port, env) for port in chosen]
        for index, server in enumerate(servers):
            for attempt in range(1, PORT_ATTEMPTS + 1):
                try:
                    server.wait_ready()
                    break
                except ProcessFailed:
                    # Another process may take a port between free_port() and daphne's bind.
                    lost_race = "Address already in use" in server.output()
                    if ports is not None or not lost_race or attempt == PORT_ATTEMPTS:
                        raise
                    server = servers[index] = self._start_daphne(name, free_port(), env)
        return servers

    def restart(self, server: DaphneServer, *, crash: bool = False) -> DaphneServer:
        """Stop ``server`` (SIGKILL if ``crash``) and start a new one on its port and env."""
        if crash:
            server.kill()
        server.stop()
        (new,) = self.daphnes(1, server.env, ports=[server.port], name=server.name)
        return new

    def _start_daphne(self, name: str, port: int, env: Mapping[str, str]) -> DaphneServer:
        server = DaphneServer(self._name(name), port, env, self.log_dir)
        self.started.append(server)
        return server

    def runworker(
        self,
        env: Mapping[str, str],
        channels: Iterable[str] = (JOBS_CHANNEL,),
        *,
        name: str = "runworker",
    ) -> ManagedProcess:
        """Start ``manage.py runworker <channels>`` and wait until it says it runs."""
        args = [sys.executable, str(MANAGE_PY), "runworker", *channels]
        worker = ManagedProcess(self._name(name), args, env, self.log_dir)
        self.started.append(worker)
        worker.wait_for_output("Running worker for channels")
        return worker

    def start(self, name: str, args: list[str], env: Mapping[str, str]) -> ManagedProcess:
        """Start any other process (e.g. a relay) under the same clean-up."""
        process = ManagedProcess(self._name(name), args, env, self.log_dir)
        self.started.append(process)
        return process

    def with_traceback(self) -> list[ManagedProcess]:
        """The processes whose output holds a Python traceback."""
        return [p for p in self.started if TRACEBACK in p.output()]

    def assert_no_tracebacks(self) -> None:
        """Fail, with the output, if any process printed a traceback."""
        broken = self.with_traceback()
        if broken:
            raise AssertionError(
                "tracebacks in " + ", ".join(p.describe() for p in broken) + "\n" + self.report()
            )

    def report(self) -> str:
        """Every process's state and output, for a failure message."""
        parts = []
        for process in self.started:
            parts.append(f"===== {process.describe()}: {' '.join(process.args)}")
            parts.append(process.output().rstrip() or "(no output)")
        return "\n".join(parts)

    def stop_all(self) -> None:
        """Stop every process: SIGTERM to all first, then wait for each (bounded)."""
        for process in self.started:
            process.terminate()
        for process in self.started:
            process.stop()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


# -- clients ----------------------------------------------------------------------------

# websockets >= 15 would use a proxy from the environment; we only talk to 127.0.0.1.
_DIRECT: dict[str, Any] = {"proxy": None} if int(websockets_version.split(".")[0]) >= 15 else {}


@dataclass
class WSClient:
    """A JSON WebSocket client; every wait is bounded and raises ``TimeoutError``."""

    connection: ClientConnection
    url: str
    received: list[Any] = field(default_factory=list)

    @classmethod
    async def connect(
        cls, url: str, *, origin: str | None = None, timeout: float = RECEIVE_TIMEOUT
    ) -> WSClient:
        """Open ``url``; ``origin`` defaults to the server's own (as a browser sends it)."""
        if origin is None:
            parts = urllib.parse.urlsplit(url)
            origin = f"http://{parts.netloc}"
        connection = await connect(
            url,
            origin=origin,  # type: ignore[arg-type]  # Origin is a NewType of str
            open_timeout=timeout,
            close_timeout=timeout,
            **_DIRECT,
        )
        return cls(connection, url)

    async def send_json(self, content: Any) -> None:
        await self.connection.send(json.dumps(content))

    async def send_text(self, text: str) -> None:
        """Send a raw text frame (e.g. something that is not JSON)."""
        await self.connection.send(text)

    async def receive_json(self, timeout: float = RECEIVE_TIMEOUT) -> Any:
        """The next message, decoded; ``TimeoutError`` if none comes in ``timeout`` s."""
        try:
            raw = await asyncio.wait_for(self.connection.recv(), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"no message from {self.url} in {timeout}s; received so far: {self.received}"
            ) from None
        content = json.loads(raw)
        self.received.append(content)
        return content

    async def receive_until(
        self, predicate: Callable[[Any], bool], timeout: float = RECEIVE_TIMEOUT
    ) -> Any:
        """The first message matching ``predicate`` within ``timeout`` s, skipping others."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise TimeoutError(
                    f"no matching message from {self.url} in {timeout}s; received: {self.received}"
                )
            content = await self.receive_json(left)
            if predicate(content):
                return content

    async def receive_type(self, kind: str, timeout: float = RECEIVE_TIMEOUT) -> Any:
        """The next message whose ``type`` is ``kind`` (e.g. ``"welcome"``)."""
        return await self.receive_until(
            lambda m: isinstance(m, dict) and m.get("type") == kind, timeout
        )

    async def assert_silent(self, duration: float = 0.3) -> None:
        """Fail if any message arrives within ``duration`` s (no duplicates, no leaks)."""
        try:
            raw = await asyncio.wait_for(self.connection.recv(), duration)
        except asyncio.TimeoutError:
            return
        raise AssertionError(f"unexpected message from {self.url}: {raw!r}")

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> WSClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(frozen=True)
class HttpResult:
    status: int
    body: str
    headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(request: urllib.request.Request, timeout: float) -> HttpResult:
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return HttpResult(response.status, response.read().decode(), dict(response.headers))
    except urllib.error.HTTPError as error:
        with error:
            return HttpResult(error.code, error.read().decode(), dict(error.headers))


async def http_get(url: str, timeout: float = 10.0) -> HttpResult:
    """GET ``url`` (on a thread); an HTTP error status is a result, not an exception."""
    return await asyncio.to_thread(_request, urllib.request.Request(url), timeout)


async def http_post(url: str, data: Mapping[str, str], timeout: float = 10.0) -> HttpResult:
    """POST ``data`` form-encoded to ``url`` (on a thread)."""
    body = urllib.parse.urlencode(data).encode()
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/x-www-form-urlencoded")
    return await asyncio.to_thread(_request, request, timeout)
