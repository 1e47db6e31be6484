"""The envelopes one instance sends: its id and namespace, and its broadcasts' numbers."""

from __future__ import annotations

import itertools

from .envelope import SyncMessage, encode_frame

__all__ = ["Frames"]


class Frames:
    """Encodes this instance's envelopes (any thread)."""

    def __init__(self, instance_id: str, namespace: str) -> None:
        self.instance_id = instance_id
        self.namespace = namespace
        # Broadcasts are numbered so that receivers can count what they missed.
        self._broadcasts = itertools.count(1)

    def frame(
        self,
        topic: str,
        data: str | bytes,
        expires: float | None = None,
        seq: int | None = None,
        ask: bool = False,
    ) -> str:
        return encode_frame(
            self.instance_id,
            SyncMessage(self.namespace, topic, data),
            seq=seq,
            expires=expires,
            ask=ask,
        )

    def broadcast(self, topic: str, data: str | bytes) -> str:
        """A frame for every instance, with the next number of this instance's broadcasts."""
        return self.frame(topic, data, seq=next(self._broadcasts))
