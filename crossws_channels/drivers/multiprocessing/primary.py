"""``setup_primary()``: starting the relay in the process that forks the servers.

The relay runs as a child process, never as a thread of the primary: the primary forks
the servers, and a fork copies a running event loop's sockets into every child. The
child learns nothing from the primary but its arguments, reports on a pipe once it
listens (so workers forked right after find it), and stops when the primary exits.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossws_channels.errors import ConfigurationError, RelayUnavailable

from .options import MultiprocessingOptions

__all__ = ["setup_primary"]

logger = logging.getLogger(__name__)

DRIVER_PATH = "crossws_channels.drivers.multiprocessing.MultiprocessingDriver"


@dataclass(slots=True)
class _PrimaryRelay:
    options: MultiprocessingOptions
    owner_pid: int
    process: subprocess.Popen[bytes] | None


_primary_lock = threading.Lock()
_primary_relays: dict[Path, _PrimaryRelay] = {}
_atexit_registered = False


def setup_primary(
    channel: str | None = None,
    *,
    socket_dir: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> None:
    """Start the relay for the processes this one is about to fork.

    Call it in the primary process, before it forks the servers: in gunicorn's
    ``on_starting`` server hook, for instance. Without ``channel`` it starts a relay for
    every layer in Django's ``CHANNEL_LAYERS`` that uses the multiprocessing driver
    (reading their ``channel`` and ``socket_dir``); with it, one for that channel.

    The relay runs as a child process, not a thread, because the primary forks: a fork
    copies a running event loop's sockets into every worker. It stops when this process
    exits, however it exits. The call returns once the relay listens, and is a no-op when
    called again, in a forked or spawned worker, or when a live relay already serves the
    channel. Raises :class:`~crossws_channels.errors.RelayUnavailable` if the relay can't
    start (for example, a socket directory that is not private).
    """
    global _atexit_registered
    if channel is None:
        targets = _options_from_settings()
    else:
        mapping: dict[str, Any] = {"channel": channel}
        if socket_dir is not None:
            mapping["socket_dir"] = socket_dir
        targets = [MultiprocessingOptions.from_mapping(mapping)]
    if multiprocessing.parent_process() is not None:
        logger.debug("setup_primary() called in a multiprocessing child: nothing to do")
        return
    with _primary_lock:
        pid = os.getpid()
        if any(relay.owner_pid != pid for relay in _primary_relays.values()):
            # Forked from the primary, which already started the relays.
            logger.debug("setup_primary() called in a forked worker: nothing to do")
            return
        for options in targets:
            if options.path in _primary_relays:
                continue
            _primary_relays[options.path] = _PrimaryRelay(
                options, pid, _start_relay(options, timeout)
            )
        if not _atexit_registered:
            atexit.register(_stop_primary_relays)
            _atexit_registered = True


def _options_from_settings() -> list[MultiprocessingOptions]:
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured

    try:
        layers = getattr(settings, "CHANNEL_LAYERS", None) or {}
    except ImproperlyConfigured as exc:
        raise ConfigurationError(
            "setup_primary() without channel= reads CHANNEL_LAYERS from the Django "
            f"settings, which are not configured ({exc}); set DJANGO_SETTINGS_MODULE or "
            "pass channel="
        ) from exc
    found: list[MultiprocessingOptions] = []
    for alias, layer in layers.items():
        config = (layer.get("CONFIG") or {}) if isinstance(layer, Mapping) else {}
        if config.get("driver") not in ("multiprocessing", DRIVER_PATH):
            continue
        mapping = {key: config[key] for key in ("channel", "socket_dir") if key in config}
        try:
            found.append(MultiprocessingOptions.from_mapping(mapping))
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"CHANNEL_LAYERS[{alias!r}]['CONFIG'][{exc.key!r}] {exc.message}", key=exc.key
            ) from exc
    if not found:
        raise ConfigurationError(
            "setup_primary() found no layer in CHANNEL_LAYERS that uses the "
            "multiprocessing driver; pass channel= to start a relay anyway"
        )
    return found


def _start_relay(options: MultiprocessingOptions, timeout: float) -> subprocess.Popen[bytes] | None:
    read_fd, write_fd = os.pipe()
    command = [
        sys.executable,
        "-m",
        "crossws_channels.relay",
        "--channel",
        options.channel,
        "--socket-dir",
        str(options.socket_dir),
        "--parent-pid",
        str(os.getpid()),
        "--ready-fd",
        str(write_fd),
    ]
    # The relay must import this package even when it is importable only thanks to the
    # primary's working directory or sys.path tweaks.
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), package_root]))
    try:
        # A session of its own keeps a Ctrl-C in the terminal from stopping the relay
        # before the servers have shut down; it stops when the primary exits instead.
        process = subprocess.Popen(
            command,
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(write_fd)
    try:
        status = _read_status(read_fd, timeout)
    finally:
        os.close(read_fd)
    word, _, detail = status.partition(" ")
    if word == "ready":
        logger.info(
            "started the relay for channel %r (pid %d) at %s",
            options.channel,
            process.pid,
            options.path,
        )
        return process
    if word == "busy":
        process.wait(timeout)
        logger.info(
            "a relay for channel %r is already running (pid %s); using it",
            options.channel,
            detail or "?",
        )
        return None
    if word != "error":
        try:
            process.wait(1.0)
            detail = f"it exited with status {process.returncode} without starting"
        except subprocess.TimeoutExpired:
            detail = f"it did not start listening within {timeout} s"
    if process.poll() is None:
        process.kill()
    process.wait()
    raise RelayUnavailable(f"could not start the relay for channel {options.channel!r}: {detail}")


def _read_status(fd: int, timeout: float) -> str:
    """Read the relay's one status line; empty if it closed the pipe or took too long."""
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(remaining, 0.0))
        if not ready:
            return ""
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _stop_primary_relays() -> None:
    with _primary_lock:
        for relay in list(_primary_relays.values()):
            process = relay.process
            if relay.owner_pid != os.getpid() or process is None:
                continue
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        _primary_relays.clear()
