#!/usr/bin/env python3
"""Development commands for crossws_channels. Needs only Python >= 3.10 with venv.

    python3 dev.py demo [--port 8000] [--processes 2] [--driver multiprocessing]
    python3 dev.py test [pytest arguments ...]
    python3 dev.py lint

Each command creates ``.venv`` in the repository when it is missing and installs the
project into it (``pip install -e '.[demo]'`` for the demo, ``'.[dev]'`` otherwise). The
install is repeated only when ``pyproject.toml`` changes: a stamp file in the virtual
environment holds the hash of the ``pyproject.toml`` it was installed from.
``CROSSWS_VENV`` names another virtual environment directory to use instead.

``demo`` serves testproject's chat as a real cluster on 127.0.0.1: by default two daphne
processes and a ``runworker`` process, relayed by the ``multiprocessing`` driver's relay
(nothing else to install); it prints the URL of each server process. Ctrl-C stops
everything. ``test`` runs pytest, passing every extra
argument through (``python3 dev.py test -x -k envelope``). ``lint`` runs ruff and mypy.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("CROSSWS_VENV") or ROOT / ".venv")
PYPROJECT = ROOT / "pyproject.toml"
HOST = "127.0.0.1"
JOBS_CHANNEL = "chat-jobs"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
# The extras each command needs; ``dev`` includes ``demo``.
SATISFIES = {"demo": ("demo", "dev"), "dev": ("dev",)}


class DevError(Exception):
    """A problem to report in one line, without a traceback."""


# -- the virtual environment ------------------------------------------------------------


def venv_python() -> Path:
    if os.name == "nt":
        return VENV / "Scripts" / "python.exe"
    return VENV / "bin" / "python"


def stamp_path(extra: str) -> Path:
    return VENV / f".crossws-{extra}.stamp"


def pyproject_hash() -> str:
    return hashlib.sha256(PYPROJECT.read_bytes()).hexdigest()


def run(command: Sequence[str | Path]) -> int:
    """Run ``command`` from the repository root; its exit code."""
    return subprocess.run([str(part) for part in command], cwd=ROOT, check=False).returncode


def ensure_venv(extra: str) -> Path:
    """The virtual environment's python, with ``.[extra]`` installed and up to date."""
    python = venv_python()
    if not python.exists():
        print(f"Creating a virtual environment in {VENV} ...", flush=True)
        if run([sys.executable, "-m", "venv", VENV]) != 0:
            raise DevError(
                "could not create the virtual environment; on Debian or Ubuntu install the "
                "python3-venv package first"
            )
        # Editable installs from pyproject.toml need pip >= 21.3.
        if run([python, "-m", "pip", "install", "--quiet", "--upgrade", "pip"]) != 0:
            raise DevError("could not upgrade pip in the virtual environment")
    digest = pyproject_hash()
    for candidate in SATISFIES[extra]:
        stamp = stamp_path(candidate)
        if stamp.exists() and stamp.read_text().strip() == digest:
            return python
    print(f"Installing crossws_channels[{extra}] into {VENV} ...", flush=True)
    if run([python, "-m", "pip", "install", "--quiet", "-e", f".[{extra}]"]) != 0:
        raise DevError(f"pip could not install crossws_channels[{extra}]; see its output above")
    stamp_path(extra).write_text(digest + "\n")
    return python


def project_env(**extra: str) -> dict[str, str]:
    """This environment, with the repository importable and testproject's settings."""
    env = dict(os.environ)
    paths = [str(ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["DJANGO_SETTINGS_MODULE"] = "testproject.settings"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


# -- test and lint ----------------------------------------------------------------------


def wait_child(command: Sequence[str | Path]) -> int:
    """Run a foreground child; on Ctrl-C (which it receives too) wait for it to finish."""
    process = subprocess.Popen([str(part) for part in command], cwd=ROOT, env=project_env())
    try:
        return process.wait()
    except KeyboardInterrupt:
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        return 130


def cmd_test(pytest_args: list[str]) -> int:
    python = ensure_venv("dev")
    return wait_child([python, "-m", "pytest", *pytest_args])


def cmd_lint() -> int:
    python = ensure_venv("dev")
    ruff = wait_child([python, "-m", "ruff", "check", "."])
    mypy = wait_child([python, "-m", "mypy"])  # files and options come from pyproject.toml
    return ruff or mypy


# -- the demo ---------------------------------------------------------------------------


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def free_ports(first: int, count: int) -> list[int]:
    """``count`` free ports: ``first`` if free, else the next free ones after it."""
    ports: list[int] = []
    port = first
    while len(ports) < count:
        if port > 65535:
            raise DevError(f"no {count} free ports from {first} up")
        if port_is_free(port):
            ports.append(port)
        port += 1
    return ports


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Service:
    """One process of the demo; its output is shown with its name in front."""

    name: str
    command: list[str]
    env: dict[str, str]
    port: int | None = None
    note: str = ""
    # A line the service prints once it is ready, for services without a port.
    ready_text: str | None = None
    process: subprocess.Popen[str] | None = field(default=None, repr=False)
    listen_failed: bool = False
    ready_seen: bool = False

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            # Ctrl-C reaches only dev.py, which then stops each service in order.
            start_new_session=os.name == "posix",
        )
        output = self.process.stdout
        threading.Thread(target=self._relay_output, args=(output,), daemon=True).start()

    def _relay_output(self, output: IO[str]) -> None:
        for line in output:
            # daphne keeps running when it can't bind its port; notice it.
            self.listen_failed = self.listen_failed or "Listen failure" in line
            if self.ready_text is not None and self.ready_text in line:
                self.ready_seen = True
            print(f"[{self.name}] {line}", end="", flush=True)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else 0

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, deadline: float) -> None:
        while self.ready_text is not None and not self.ready_seen:
            if not self.running():
                raise DevError(f"{self.name} exited during start-up; see its output above")
            if time.monotonic() > deadline:
                raise DevError(f"{self.name} did not report that it is ready")
            time.sleep(0.05)
        while self.port is not None and not accepts(self.port):
            if self.listen_failed:
                raise DevError(f"{self.name} could not listen on port {self.port}")
            if not self.running():
                raise DevError(f"{self.name} exited during start-up; see its output above")
            if time.monotonic() > deadline:
                raise DevError(f"{self.name} does not accept connections on port {self.port}")
            time.sleep(0.1)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> None:
        if self.process is None:
            return
        self.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def plan_demo(python: Path, driver: str, ports: list[int]) -> list[Service]:
    """The processes of a demo with ``driver``: one daphne per port, and the worker.

    A driver that spans processes gets ``manage.py runworker chat-jobs`` as a process of
    its own; with ``local`` the (only) server process runs the worker on a thread. The
    ``multiprocessing`` driver's relay goes first in the list: services start in order
    (each waiting for the previous ones to be ready) and stop in order.
    """
    embedded = driver == "local"
    # A cluster of its own: another demo (or a test run) on this host never bridges in.
    channel = f"demo-{os.getpid()}"
    env = project_env(
        CROSSWS_DRIVER=driver,
        CROSSWS_CHANNEL=channel,
        TESTPROJECT_EMBEDDED_WORKER="1" if embedded else "0",
    )
    services = []
    if driver == "multiprocessing":
        services.append(
            Service(
                name="relay",
                command=[str(python), "-m", "crossws_channels.relay", "--channel", channel],
                env=env,
                note="relays between the processes",
                ready_text="listening on",
            )
        )
    services += [
        Service(
            name=f"daphne-{n}" if len(ports) > 1 else "daphne",
            command=[
                str(python),
                "-m",
                "daphne",
                "-b",
                HOST,
                "-p",
                str(port),
                "testproject.asgi:application",
            ],
            env=env,
            port=port,
            note=f"also runs the {JOBS_CHANNEL} worker" if embedded else "",
        )
        for n, port in enumerate(ports, 1)
    ]
    if not embedded:
        manage = str(ROOT / "testproject" / "manage.py")
        services.append(Service("runworker", [str(python), manage, "runworker", JOBS_CHANNEL], env))
    return services


class Stop(Exception):
    """Raised in the main thread by SIGTERM or SIGHUP, to stop like Ctrl-C."""


STOP_SIGNALS = [
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
]


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise Stop(signal.Signals(signum).name)


def cmd_demo(args: argparse.Namespace) -> int:
    driver: str = args.driver or ("local" if args.processes == 1 else "multiprocessing")
    if args.processes < 1:
        raise DevError("--processes must be at least 1")
    if args.processes > 1 and driver == "local":
        raise DevError(
            "the local driver spans one process only; with --processes > 1 choose a driver "
            "that connects processes (--driver redis, pgsql, nats or multiprocessing)"
        )
    python = ensure_venv("demo")
    ports = free_ports(args.port, args.processes)
    if ports[0] != args.port:
        print(f"Port {args.port} is taken; using {', '.join(map(str, ports))}.")
    services = plan_demo(python, driver, ports)
    for signum in STOP_SIGNALS:
        if signum != signal.SIGINT:
            signal.signal(signum, _raise_stop)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        for service in services:
            service.start()
            if service.ready_text is not None:
                # The servers need it from their first moment (the relay).
                service.wait_ready(deadline)
        for service in services:
            service.wait_ready(deadline)
        servers = "server process" if len(ports) == 1 else "server processes"
        print(f"\ncrossws_channels demo: driver {driver!r}, {len(ports)} {servers}")
        for service in services:
            where = f"http://{HOST}:{service.port}/" if service.port else "(no port)"
            note = f"  ({service.note})" if service.note else ""
            print(f"  {where:<28} {service.name}, pid {service.pid}{note}")
        rooms = [f"http://{HOST}:{port}/chat/lobby/" for port in ports]
        if len(rooms) == 1:
            print(f"\nOpen {rooms[0]} in two tabs and chat.", end=" ")
        else:
            print(
                f"\nOpen {' and '.join(rooms)} in separate tabs: each tab is served by "
                "another process, and they chat with each other.",
                end=" ",
            )
        print(
            f"\nBackplane status page: http://{HOST}:{ports[0]}/backplane/ ; Prometheus "
            f"metrics: http://{HOST}:{ports[0]}/metrics (this process), "
            f"http://{HOST}:{ports[0]}/metrics?scope=cluster (every process).",
            end=" ",
        )
        print("Ctrl-C stops the demo.\n", flush=True)
        while all(service.running() for service in services):
            time.sleep(0.2)
        dead = next(service for service in services if not service.running())
        raise DevError(f"{dead.name} (pid {dead.pid}) exited; stopping the demo")
    except (KeyboardInterrupt, Stop):
        print("\nStopping the demo ...", flush=True)
        return 0
    finally:
        # The services run in sessions of their own: finish stopping them even if
        # Ctrl-C is pressed again (stop() kills what doesn't exit in time).
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        for service in services:
            service.terminate()
        for service in services:
            service.stop()


# -- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dev.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser("demo", help="serve testproject's chat on 127.0.0.1")
    demo.add_argument(
        "--port", type=int, default=8000, help="first port (default 8000, or the next free one)"
    )
    demo.add_argument("--processes", type=int, default=2, help="server processes (default 2)")
    demo.add_argument(
        "--driver",
        help="backplane driver (default local for one process, multiprocessing for several); "
        "redis, pgsql and nats read CROSSWS_REDIS_URL / CROSSWS_PG_DSN / CROSSWS_NATS_URL",
    )
    commands.add_parser(
        "test", help="run pytest; every further argument goes to pytest", add_help=False
    )
    commands.add_parser("lint", help="run ruff and mypy")

    # dev.py may be started by any python3; the project needs 3.10.
    if sys.version_info < (3, 10):  # noqa: UP036
        print(f"dev.py: Python 3.10 or newer is needed, this is {sys.version.split()[0]}")
        return 1
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "test" belongs to pytest, including options such as -x or -h.
    if argv[:1] == ["test"]:
        parsed, rest = parser.parse_args(argv[:1]), argv[1:]
    else:
        parsed, rest = parser.parse_args(argv), []
    try:
        if parsed.command == "demo":
            return cmd_demo(parsed)
        if parsed.command == "test":
            return cmd_test(rest)
        return cmd_lint()
    except DevError as error:
        print(f"dev.py: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
