"""The multiprocessing driver's options, shared by the driver and ``setup_primary()``."""

from __future__ import annotations

import os
import shlex
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossws_channels.errors import ConfigurationError

from . import paths

__all__ = ["MultiprocessingOptions"]


@dataclass(frozen=True, slots=True)
class MultiprocessingOptions:
    """The driver's options, validated.

    ``socket_dir`` is the directory in which the relay keeps its private directory
    ``crossws_channels-<uid>/`` (default: the system's temporary directory). Every
    process of a cluster, and the relay, must use the same value.
    """

    channel: str
    socket_dir: Path

    KEYS = frozenset({"channel", "socket_dir"})

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> MultiprocessingOptions:
        unknown = sorted(set(options) - cls.KEYS)
        if unknown:
            raise ConfigurationError(
                "is not an option of the multiprocessing driver (it takes channel and socket_dir)",
                key=unknown[0],
            )
        channel = options.get("channel")
        if not isinstance(channel, str) or not channel:
            raise ConfigurationError("must be a non-empty string", key="channel")
        raw_dir = options.get("socket_dir")
        if raw_dir is None:
            socket_dir = paths.default_socket_dir()
        elif isinstance(raw_dir, (str, os.PathLike)) and str(raw_dir):
            socket_dir = Path(raw_dir)
            if not socket_dir.is_absolute():
                raise ConfigurationError(
                    f"must be an absolute path, not {str(raw_dir)!r}: the relay and every "
                    "server process must agree on it whatever their working directory",
                    key="socket_dir",
                )
        else:
            raise ConfigurationError("must be a directory path (a string)", key="socket_dir")
        if not hasattr(socket, "AF_UNIX"):
            raise ConfigurationError(
                "cannot be 'multiprocessing' here: it needs Unix domain sockets, which this "
                "platform lacks; use the redis or pgsql driver",
                key="driver",
            )
        path = paths.socket_path(channel, socket_dir)
        if len(os.fsencode(path)) > paths.MAX_PATH_BYTES:
            raise ConfigurationError(
                f"is too long: the relay socket path {str(path)!r} would exceed the "
                f"{paths.MAX_PATH_BYTES}-byte limit of Unix socket paths; choose a shorter "
                "socket_dir",
                key="socket_dir",
            )
        return cls(channel, socket_dir)

    @property
    def path(self) -> Path:
        """The relay's socket."""
        return paths.socket_path(self.channel, self.socket_dir)

    def relay_command(self) -> str:
        """The shell command that starts a relay for these options."""
        command = f"python -m crossws_channels.relay --channel {shlex.quote(self.channel)}"
        if self.socket_dir != paths.default_socket_dir():
            command += f" --socket-dir {shlex.quote(str(self.socket_dir))}"
        return command
