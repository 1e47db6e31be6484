"""The envelopes one instance sends: its id and namespace, and its broadcasts' numbers."""

from __future__ import annotations

import itertools

from ._sealing import Sealer
from .envelope import SyncMessage, encode_frame

__all__ = ["Frames"]

# Topics whose numbering is remembered (one per group a sender sends to, with a topic
# per group).
TOPICS_NUMBERED = 65536


class Frames:
    """Encodes this instance's envelopes (any thread), sealed when the cluster signs."""

    def __init__(self, instance_id: str, namespace: str, sealer: Sealer | None = None) -> None:
        self.instance_id = instance_id
        self.namespace = namespace
        self.sealer = sealer
        # Broadcasts are numbered so that receivers can count what they missed; so are
        # the messages sent on each topic (routing "groups"), each topic on its own.
        self._broadcasts = itertools.count(1)
        self._topics: dict[str, itertools.count[int]] = {}

    def frame(
        self,
        topic: str,
        data: str | bytes,
        expires: float | None = None,
        seq: int | None = None,
        ask: bool = False,
    ) -> str:
        sealer = self.sealer
        if sealer is not None and sealer.encrypt:
            data = sealer.encrypt_data(self.instance_id, topic, data)
        text = encode_frame(
            self.instance_id,
            SyncMessage(self.namespace, topic, data),
            seq=seq,
            expires=expires,
            ask=ask,
        )
        return text if sealer is None else sealer.seal(text)

    def broadcast(self, topic: str, data: str | bytes) -> str:
        """A frame for every instance, with the next number of this instance's broadcasts."""
        return self.frame(topic, data, seq=next(self._broadcasts))

    def routed(self, topic: str, group: str, data: str | bytes) -> str:
        """A frame for the instances listening to ``topic``, numbered on that topic."""
        counter = self._topics.get(topic)
        if counter is None:
            if len(self._topics) >= TOPICS_NUMBERED:
                # Numbering starts afresh: receivers take that for late messages, never
                # for lost ones.
                self._topics.clear()
            counter = self._topics[topic] = itertools.count(1)
        return self.frame(group, data, seq=next(counter))
