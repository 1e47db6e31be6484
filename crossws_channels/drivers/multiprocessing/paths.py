"""Where a multiprocessing relay listens, and who may talk to it.

A relay listens on a Unix domain socket in a private directory,
``<socket_dir>/crossws_channels-<uid>/``, mode 0700 and owned by the user (``socket_dir``
is ``$XDG_RUNTIME_DIR`` by default, or ``/tmp`` without one). The socket's
name is derived from the cluster's ``channel``, so two clusters on one host never meet,
and the directory is per user, so the relays of two users never meet either. Both ends
also check the other's user id on the connected socket where the platform tells it
(``SO_PEERCRED`` on Linux): a file mode is one mistake away from being too open.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import stat
import struct
import tempfile
from pathlib import Path

__all__ = [
    "MAX_PATH_BYTES",
    "UnsafeDirectory",
    "check_private_dir",
    "default_socket_dir",
    "ensure_private_dir",
    "lock_path",
    "peer_credentials",
    "private_dir",
    "socket_path",
]

# sockaddr_un.sun_path is 108 bytes on Linux and 104 on macOS, NUL included.
MAX_PATH_BYTES = 103

_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


class UnsafeDirectory(PermissionError):
    """The relay directory is not private to this user, so it must not be used."""


def default_socket_dir() -> Path:
    """``$XDG_RUNTIME_DIR`` when it is set and private to this user, else the system's
    temporary directory (``TMPDIR`` or ``/tmp``).

    The runtime directory (``/run/user/<uid>``, made by systemd-logind) is this user's
    alone, so no other user can create the relay's directory in it first and keep the
    relay from starting, as anyone can in ``/tmp``.
    """
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        try:
            check_private_dir(Path(runtime))
        except OSError:
            pass  # not there, or not private: the spec says to fall back
        else:
            return Path(runtime)
    return Path(tempfile.gettempdir())


def private_dir(socket_dir: Path) -> Path:
    return socket_dir / f"crossws_channels-{os.geteuid()}"


def _stem(channel: str) -> str:
    # Readable for an operator listing the directory, unique thanks to the digest, and
    # short enough to fit sun_path whatever the channel name is.
    readable = _UNSAFE_CHARS.sub("_", channel)[:24]
    digest = hashlib.sha256(channel.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{readable}-{digest}"


def socket_path(channel: str, socket_dir: Path) -> Path:
    return private_dir(socket_dir) / f"{_stem(channel)}.sock"


def lock_path(channel: str, socket_dir: Path) -> Path:
    return private_dir(socket_dir) / f"{_stem(channel)}.lock"


def check_private_dir(path: Path) -> None:
    """Raise :class:`UnsafeDirectory` unless ``path`` is a directory only we can use.

    ``FileNotFoundError`` propagates: a missing directory means no relay, not an attack.
    """
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory")
    if info.st_uid != os.geteuid():
        raise UnsafeDirectory(
            f"{path} belongs to uid {info.st_uid}, not to this user (uid {os.geteuid()}); "
            "another user may have created it to intercept the relay. Remove it, or "
            "choose another socket_dir"
        )
    if info.st_mode & 0o077:
        raise UnsafeDirectory(
            f"{path} has mode {stat.S_IMODE(info.st_mode):04o}; the relay directory must "
            "be private (0700). Fix it with chmod 700, or remove it"
        )


def ensure_private_dir(socket_dir: Path) -> Path:
    """Create the private directory under ``socket_dir`` (0700) if needed; return it."""
    directory = private_dir(socket_dir)
    socket_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        pass
    else:
        # mkdir's mode is filtered by the umask; make sure of the exact bits.
        os.chmod(directory, 0o700)
    check_private_dir(directory)
    return directory


_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int] | None:
    """Return ``(pid, uid)`` of the process at the other end of a Unix socket.

    ``None`` where the platform does not say (everything but Linux here); those rely on
    the directory permissions alone.
    """
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, option, _UCRED.size)
    pid, uid, _gid = _UCRED.unpack(raw)
    return pid, uid
