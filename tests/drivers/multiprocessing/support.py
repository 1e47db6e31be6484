"""Helpers shared by the multiprocessing tests: relays and layers in real OS processes.

Not a test module itself; it sits under a ``test_`` name so that it stays next to the
tests that use it. Its :class:`Agent` drives an agent process (:mod:`tests.agent`, a
process holding one ``BackplaneChannelLayer``) from the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossws_channels.drivers.multiprocessing import paths
from tests.agent import ROOT, AgentError, child_env, from_json, to_json

__all__ = [
    "ROOT",
    "Agent",
    "AgentError",
    "RelayProcess",
    "child_env",
    "from_json",
    "short_socket_dir",
    "to_json",
]


@contextlib.contextmanager
def short_socket_dir() -> Iterator[Path]:
    """A fresh ``socket_dir`` with a short path (pytest's tmp_path is too long for a
    Unix socket once the private directory and socket name are added)."""
    directory = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp"))
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class RelayProcess:
    """``python -m crossws_channels.relay`` in a child process, restartable."""

    def __init__(self, channel: str, socket_dir: Path, log_dir: Path) -> None:
        self.channel = channel
        self.socket_dir = socket_dir
        self.log_path = log_dir / f"relay-{channel}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def path(self) -> Path:
        return paths.socket_path(self.channel, self.socket_dir)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "crossws_channels.relay",
            "--channel",
            self.channel,
            "--socket-dir",
            str(self.socket_dir),
            *extra,
        ]

    def start(self, timeout: float = 15.0) -> float:
        """Start the relay and wait until it listens; return when it did (monotonic)."""
        read_fd, write_fd = os.pipe()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command("--ready-fd", str(write_fd)),
                pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                cwd=ROOT,
            )
        os.close(write_fd)
        try:
            ready, _, _ = select.select([read_fd], [], [], timeout)
            status = os.read(read_fd, 4096).decode() if ready else ""
        finally:
            os.close(read_fd)
        if not status.startswith("ready"):
            self.kill()
            raise RuntimeError(f"the relay did not start ({status!r}):\n{self.output()}")
        self.starts += 1
        return time.monotonic()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the relay and wait for it to exit; return its exit status."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signum)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: the relay dies without cleaning up, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> RelayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


# Agents: layers in other processes.


class Agent:
    """A layer in another process, driven from the test's event loop."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.instance_id = ""
        self._answers: dict[int, asyncio.Future[Any]] = {}
        self._next = 0
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, config: dict[str, Any], log_dir: Path, name: str) -> Agent:
        """Start an agent and wait until its layer's subscription is in place."""
        log_path = log_dir / f"agent-{name}.log"
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.agent",
                json.dumps(config),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=child_env(DJANGO_SETTINGS_MODULE="testproject.settings"),
                cwd=ROOT,
            )
        agent = cls(process, log_path)
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
        except asyncio.TimeoutError:
            line = b""
        if not line:
            await agent.kill()
            raise RuntimeError(f"agent {name} did not start:\n{agent.output()}")
        agent.instance_id = json.loads(line)["instance_id"]
        agent._reader = asyncio.ensure_future(agent._read())
        return agent

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            answer = json.loads(line)
            future = self._answers.pop(answer["id"], None)
            if future is None or future.done():
                continue
            if answer["ok"]:
                future.set_result(from_json(answer["result"]))
            else:
                future.set_exception(AgentError(answer["error"], answer["message"]))
        for future in self._answers.values():
            if not future.done():
                future.set_exception(RuntimeError("the agent exited"))

    async def call(self, op: str, *args: Any, timeout: float = 15.0) -> Any:
        """Run ``layer.<op>(*args)`` in the agent and return its result."""
        assert self.process.stdin is not None
        self._next += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._answers[self._next] = future
        command = {"id": self._next, "op": op, "args": to_json(list(args))}
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        return await asyncio.wait_for(future, timeout)

    async def close(self) -> None:
        """Close the agent's layer and wait for it to exit (kill it after a bound)."""
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.write(b"\n")
            with contextlib.suppress(ConnectionError):
                await self.process.stdin.drain()
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except asyncio.TimeoutError:
                pass
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL, as a crash would; then reap the process."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 5)
