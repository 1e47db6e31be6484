"""The standalone relay of the multiprocessing driver.

Run one per cluster when the server processes are started separately rather than forked
by one primary, for example two daphne processes and ``manage.py runworker`` under a
process manager::

    python -m crossws_channels.relay --channel my-app

``--channel`` (and ``--socket-dir``, if the layer's CONFIG sets ``socket_dir``) must match
the layer's CONFIG. The relay stops cleanly on SIGTERM or SIGINT, refuses to start while
another live relay serves the same channel (exit status 3), and removes a socket left
behind by a relay that died.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .drivers.multiprocessing import paths
from .drivers.multiprocessing.relay import RelayAlreadyRunning, serve

__all__ = ["EXIT_ALREADY_RUNNING", "EXIT_ERROR", "main"]

logger = logging.getLogger("crossws_channels.relay")

EXIT_ERROR = 1
EXIT_ALREADY_RUNNING = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m crossws_channels.relay",
        description=(
            "Relay crossws_channels messages between the processes of one cluster on this "
            "host (the multiprocessing driver)."
        ),
    )
    parser.add_argument(
        "--channel", required=True, help="the cluster's channel, as in the layer's CONFIG"
    )
    parser.add_argument(
        "--socket-dir",
        type=Path,
        default=None,
        help=(
            "the directory that holds the relay's private socket directory, as the "
            f"layer's socket_dir option (default: {paths.default_socket_dir()})"
        ),
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (default: INFO)",
    )
    # Used by setup_primary(): stop when that process exits, and report readiness on a
    # pipe so that the primary knows the relay listens before it forks the servers.
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _tell(fd: int | None, line: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, line.encode("utf-8", "replace") + b"\n")
        os.close(fd)
    except OSError:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the relay; return the process exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s crossws_channels relay[%(process)d] %(levelname)s %(message)s",
    )
    channel: str = args.channel
    if not channel:
        logger.error("--channel must not be empty")
        return EXIT_ERROR
    socket_dir: Path = args.socket_dir or paths.default_socket_dir()
    if not socket_dir.is_absolute():
        socket_dir = socket_dir.absolute()
    ready_fd: int | None = args.ready_fd
    # Whatever the relay creates (its directory, socket and lock) is for this user only.
    os.umask(0o077)

    def ready(path: Path) -> None:
        nonlocal ready_fd
        _tell(ready_fd, f"ready {os.getpid()} {path}")
        ready_fd = None

    try:
        asyncio.run(serve(channel, socket_dir, parent_pid=args.parent_pid, on_ready=ready))
    except RelayAlreadyRunning as exc:
        logger.error("%s; not starting another one", exc)
        _tell(ready_fd, f"busy {exc.pid or 0}")
        return EXIT_ALREADY_RUNNING
    except OSError as exc:
        logger.error("cannot start the relay for channel %r: %s", channel, exc)
        _tell(ready_fd, f"error {exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
