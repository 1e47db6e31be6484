"""The envelopes one instance sends: its id and namespace, and its broadcasts' numbers."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence

from ._sealing import Sealer
from .envelope import encode_frame_after, frame_head

__all__ = ["GROUPS", "Frames", "pack_groups", "unpack_groups"]

# The topic of one message to several groups (group_send_many). Not a group name, so
# no crossws peer delivers it, and without the "!" of control messages, so that our own
# echo is dropped unread like any other.
GROUPS = "*groups"
# Groups named in one such envelope; more go in several (each receiver decodes what it
# is sent, and this keeps envelopes within the receivers' bound).
GROUPS_PER_ENVELOPE = 256

# Topics whose numbering is remembered (one per group a sender sends to, with a topic
# per group).
TOPICS_NUMBERED = 65536
# Topics (groups, channels) whose envelopes' common beginning is kept, encoded.
HEADS_KEPT = 4096


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
        self._heads: dict[str, str] = {}

    def frame(
        self,
        topic: str,
        data: str | bytes,
        expires: float | None = None,
        seq: int | None = None,
        ask: bool = False,
        stamp: bool = False,
    ) -> str:
        """``stamp``: a message for channels, carrying when it was sent (relay lag)."""
        sealer = self.sealer
        if sealer is not None and sealer.encrypt:
            data = sealer.encrypt_data(self.instance_id, topic, data)
        head = self._heads.get(topic)
        if head is None:
            if len(self._heads) >= HEADS_KEPT:
                self._heads.clear()
            head = self._heads[topic] = frame_head(self.instance_id, self.namespace, topic)
        text = encode_frame_after(
            head,
            data,
            seq=seq,
            expires=expires,
            ask=ask,
            sent=time.time_ns() // 1000 if stamp else None,
        )
        return text if sealer is None else sealer.seal(text)

    def broadcast(self, topic: str, data: str | bytes) -> str:
        """A frame for every instance, with the next number of this instance's broadcasts
        (and, unless it is a control message, when it was sent)."""
        return self.frame(topic, data, seq=next(self._broadcasts), stamp=topic[:1] != "!")

    def routed(self, topic: str, group: str, data: str | bytes) -> str:
        """A frame for the instances listening to ``topic``, numbered on that topic."""
        counter = self._topics.get(topic)
        if counter is None:
            if len(self._topics) >= TOPICS_NUMBERED:
                # Numbering starts afresh: receivers take that for late messages, never
                # for lost ones.
                self._topics.clear()
            counter = self._topics[topic] = itertools.count(1)
        return self.frame(group, data, seq=next(counter), stamp=True)


def pack_groups(groups: Sequence[str], payload: str | bytes) -> str | bytes:
    """The data of a :data:`GROUPS` envelope: the groups as a JSON list, a newline, and
    the serialized message (JSON never writes a raw newline, so the first one splits)."""
    names = json.dumps(list(groups), separators=(",", ":"))
    if isinstance(payload, bytes):
        return names.encode() + b"\n" + payload
    return names + "\n" + payload


def unpack_groups(data: str | bytes) -> tuple[list[str], str | bytes]:
    """The groups and the serialized message of a :data:`GROUPS` envelope.

    Raises ``ValueError`` for data that isn't one.
    """
    payload: str | bytes
    try:
        if isinstance(data, bytes):
            head, sep, payload = data.partition(b"\n")
            names: object = json.loads(head)
        else:
            head_text, sep_text, payload = data.partition("\n")
            names, sep = json.loads(head_text), sep_text.encode()
    except ValueError:
        names, sep = None, b""
    if not sep or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("not a list of groups and a message")
    return names, payload
