"""Where the driver runs: one event loop, its *home*, whatever loop the caller is on.

Channels calls a layer from the server's loop, from ``async_to_sync`` in sync views
(which under an ASGI server runs on the server's loop, and elsewhere on a fresh loop per
call), from management commands and worker threads. Network clients are bound to the loop
that opened them, so the driver lives on exactly one loop:

* the first loop that uses the layer, when that loop lives on (a server's loop);
* otherwise a daemon thread with a loop of its own, started on demand. A loop made by
  ``async_to_sync`` for a single call never becomes home, and once a home loop has ended
  (``asyncio.run`` returned) the thread takes over for good.

Calls from the home loop go straight on; calls from elsewhere are handed over
thread-safely (:meth:`Home.call_soon`, :meth:`Home.run`). Nothing is ever bound to a
caller's short-lived loop, so nothing leaks per loop and nothing is delivered into a loop
that is gone.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from asgiref.sync import AsyncToSync

__all__ = ["Home", "throwaway"]

T = TypeVar("T")


def throwaway(loop: asyncio.AbstractEventLoop) -> bool:
    """True for the loop ``async_to_sync`` makes for one call and closes right after."""
    return loop in getattr(AsyncToSync, "loop_thread_executors", {})


class _LoopThread:
    """A daemon thread running an event loop, home when no caller's loop can be."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="crossws-channels", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            if tasks:
                self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self) -> None:
        if not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:
                pass
        if threading.current_thread() is not self._thread:
            self._thread.join(5)


class Home:
    """The home loop of one layer instance, and the thread that may provide it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None
        # After a home loop ended under the layer, only the thread is trusted.
        self.prefer_thread = False
        self._thread: _LoopThread | None = None

    def here(self) -> bool:
        """Whether the caller runs on the home loop."""
        return asyncio.events._get_running_loop() is self.loop

    def alive(self, current: asyncio.AbstractEventLoop) -> bool:
        """Whether the home loop can serve a caller on ``current``."""
        home = self.loop
        return home is not None and (
            home is current or (home.is_running() and not home.is_closed())
        )

    def choose(self, current: asyncio.AbstractEventLoop) -> tuple[asyncio.AbstractEventLoop, bool]:
        """The loop to make home for a caller on ``current`` (under :attr:`lock`), and
        whether it is the thread's (then ``current`` is not it)."""
        if not self.prefer_thread and not throwaway(current):
            return current, False
        if self._thread is None:
            self._thread = _LoopThread()
        return self._thread.loop, True

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> bool:
        """Run ``callback(*args)`` on the home loop: now if the caller is on it, else
        soon. False if there is no home loop, or it is closed."""
        home = self.loop
        if home is None:
            return False
        if asyncio.events._get_running_loop() is home:
            callback(*args)
            return True
        try:
            home.call_soon_threadsafe(callback, *args)
        except RuntimeError:
            return False
        return True

    async def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """``await make()`` on the home loop, from any loop."""
        home = self.loop
        if home is None:
            raise RuntimeError("the backplane is not running")
        if asyncio.get_running_loop() is home:
            return await make()

        async def there() -> T:
            return await make()

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(there(), home))

    def release_thread(self) -> _LoopThread | None:
        """Take the thread out (to stop it); the next home may start another."""
        with self.lock:
            thread, self._thread = self._thread, None
            self.prefer_thread = False
        return thread

    def thread(self) -> _LoopThread | None:
        return self._thread
