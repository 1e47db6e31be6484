"""Signed (and encrypted) envelopes: ``signing_keys`` and ``encryption_keys``.

A sealed envelope is the ordinary envelope with three keys appended, in this order::

    {"id":...,"msg":{...},"seq":7,"ts":1764680000.123,"n":42,"sig":"1f2e3d4c.<HMAC>"}

``sig`` is the key's id and an HMAC-SHA256 (its first 128 bits, in hex: RFC 2104 allows
truncating to half), over every byte before ``,"sig"``:
the envelope as sent, its timestamp ``ts`` and ``n``, a number the sender gives each
envelope it seals. A receiver checks the HMAC before it parses anything else, so forged
traffic costs one hash; then the timestamp must be within ``replay_window`` of its clock
and ``(sender, n)`` new (:class:`ReplayGuard`). Nothing before ``sig`` changes, so a
receiver still recognises its own echo by the prefix without checking it.

With encryption, the message data travels as text: a marker, then base64 of a random
nonce and AES-256-GCM of the data, bound to the sender and topic; the HMAC covers it too.
(Text rather than the envelope's binary form, whose browser-compatible base64 decoding
cost a receiver more than the decryption.) Group and
channel names stay readable (the backplane routes on them); the messages do not.

Keys are derived from each secret (an HMAC of the secret with a fixed label), so a signing
secret and an encryption secret of the same text are different keys.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

__all__ = ["ENCRYPTED_MARKER", "Key", "Opened", "ReplayGuard", "Sealer", "derive_keys"]

_SIG = ',"sig":"'
_SIG_BYTES = _SIG.encode()
_TS_BYTES = b',"ts":'
_N_BYTES = b',"n":'
_KID_LENGTH = 8
_MAC_BYTES = 16
# The tail after ,"sig":" : the key id, a dot, the MAC in hex and the closing "} .
_MAC_AT = _KID_LENGTH + 1
_DOT = ord(".")
_TAIL_LENGTH = _MAC_AT + 2 * _MAC_BYTES + 2

ENCRYPTED_MARKER = "cwE1:"
"""Starts encrypted data (a message's own data is JSON, or binary)."""
_NONCE_LENGTH = 12
_TEXT, _BINARY = b"t", b"b"


class Unauthenticated(Exception):
    """Why a sealed envelope was refused (a short reason: the report names it)."""


@dataclass(frozen=True, slots=True)
class Key:
    """One secret's keys: its id on the wire, its MAC, and its cipher if encrypting."""

    kid: bytes
    # The HMAC with the key already absorbed: copying it skips hashing the padded key
    # twice per envelope.
    keyed: Any
    aead: Any = None  # cryptography's AESGCM, when encrypting

    def sign(self, body: bytes | memoryview) -> bytes:
        """The truncated HMAC of ``body``."""
        h = self.keyed.copy()
        h.update(body)
        digest: bytes = h.digest()
        return digest[:_MAC_BYTES]


class Opened(NamedTuple):
    """What the seal of a verified envelope says: the key that signed it, when, and its
    sender's number for it. (A tuple: one is made per envelope received.)"""

    key: Key
    timestamp: float
    number: int


def derive_keys(secrets: Sequence[bytes], *, encrypt: bool) -> list[Key]:
    """The keys of each secret, in order (the first signs)."""
    aesgcm: Any = None
    if encrypt:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        aesgcm = AESGCM
    keys = []
    for secret in secrets:
        label = b"crossws_channels/v1/encryption-mac" if encrypt else b"crossws_channels/v1/mac"
        mac = hmac.new(secret, label, hashlib.sha256).digest()
        kid = hashlib.sha256(b"crossws_channels/v1/key-id" + mac).hexdigest()[:_KID_LENGTH]
        aead = None
        if aesgcm is not None:
            aead = aesgcm(hmac.new(secret, b"crossws_channels/v1/aead", hashlib.sha256).digest())
        keys.append(Key(kid.encode("ascii"), hmac.new(mac, digestmod=hashlib.sha256), aead))
    return keys


class Sealer:
    """Seals what this instance sends and opens what it receives (any thread)."""

    def __init__(self, keys: Sequence[Key], *, encrypt: bool) -> None:
        if not keys:
            raise ValueError("no keys")
        self.encrypt = encrypt
        self._signing = keys[0]
        self._kid = keys[0].kid.decode("ascii")
        self._keys = {key.kid: key for key in keys}
        self._numbers = itertools.count(1)

    # Sending

    def seal(self, text: str) -> str:
        """``text`` (an envelope) with its timestamp, number and signature appended."""
        key = self._signing
        body = f'{text[:-1]},"ts":{time.time():.3f},"n":{next(self._numbers)}'
        return f'{body}{_SIG}{self._kid}.{key.sign(body.encode("utf-8")).hex()}"}}'

    def encrypt_data(self, sender: str, topic: str, data: str | bytes) -> str:
        """``data`` encrypted for the envelope ``sender`` sends on ``topic``."""
        if isinstance(data, str):
            plain = _TEXT + data.encode("utf-8", "surrogatepass")
        else:
            plain = _BINARY + bytes(data)
        nonce = os.urandom(_NONCE_LENGTH)
        sealed: bytes = self._signing.aead.encrypt(nonce, plain, _bound(sender, topic))
        return ENCRYPTED_MARKER + base64.b64encode(nonce + sealed).decode("ascii")

    # Receiving

    def open(self, raw: str | bytes) -> Opened:
        """Verify ``raw``'s signature; raise :class:`Unauthenticated` saying why not."""
        # Every envelope received comes through here: written for speed (slices of the
        # bytes as they arrived, no copy of the body), checks first.
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        at = data.rfind(_SIG_BYTES)
        if at < 0:
            raise Unauthenticated("unsigned")
        tail = at + len(_SIG_BYTES)
        if len(data) - tail != _TAIL_LENGTH or data[tail + _KID_LENGTH] != _DOT:
            raise Unauthenticated("malformed signature")
        key = self._keys.get(data[tail : tail + _KID_LENGTH])
        if key is None:
            raise Unauthenticated("signed with an unknown key")
        # Compared as the exact lowercase hex written: no other spelling of the same MAC
        # (upper case) passes for it.
        expected = key.sign(memoryview(data)[:at]).hex().encode("ascii")
        if not hmac.compare_digest(expected, data[tail + _MAC_AT : -2]):
            raise Unauthenticated("bad signature")
        # Authentic from here on: these were written by a holder of the key.
        ts_at = data.rfind(_TS_BYTES, 0, at)
        n_at = data.rfind(_N_BYTES, ts_at, at)
        try:
            timestamp = float(data[ts_at + len(_TS_BYTES) : n_at])
            number = int(data[n_at + len(_N_BYTES) : at])
        except ValueError:
            raise Unauthenticated("malformed seal") from None
        return Opened(key, timestamp, number)

    def data_of(self, opened: Opened, sender: str, topic: str, data: str | bytes) -> str | bytes:
        """The message ``data`` of an envelope from ``sender`` on ``topic`` (its seal
        ``opened``): as it came, or decrypted when the cluster encrypts; raise
        :class:`Unauthenticated`."""
        if not self.encrypt:
            return data
        return self.decrypt_data(opened, sender, topic, data)

    def decrypt_data(
        self, opened: Opened, sender: str, topic: str, data: str | bytes
    ) -> str | bytes:
        """The data :meth:`encrypt_data` encrypted; raise :class:`Unauthenticated`."""
        if not isinstance(data, str) or not data.startswith(ENCRYPTED_MARKER):
            raise Unauthenticated("not encrypted")
        aead = opened.key.aead
        if aead is None:
            raise Unauthenticated("not signed with an encryption key")
        try:
            # Not validate=True (a regular expression over the text): the text is
            # authenticated already, and the cipher refuses anything altered.
            raw = base64.b64decode(data[len(ENCRYPTED_MARKER) :])
            nonce, sealed = raw[:_NONCE_LENGTH], raw[_NONCE_LENGTH:]
            plain: bytes = aead.decrypt(nonce, sealed, _bound(sender, topic))
        except Exception:
            raise Unauthenticated("can't be decrypted") from None
        if plain[:1] == _TEXT:
            return plain[1:].decode("utf-8", "surrogatepass")
        return plain[1:]


@functools.lru_cache(maxsize=1024)
def _bound(sender: str, topic: str) -> bytes:
    # The ciphertext is bound to who sent it on which topic: moved to another envelope
    # (whose HMAC an attacker can't forge anyway) it would not decrypt.
    return sender.encode("utf-8", "surrogatepass") + b"\0" + topic.encode("utf-8", "surrogatepass")


# Numbers of one sender remembered behind its highest: envelopes overtaking each other by
# more than this are refused (one connection per sender keeps them in order).
NUMBER_WINDOW = 1024
# Senders remembered at once. Only authenticated senders get an entry; an entry whose
# last envelope is older than the replay window can go, since a replay of any of its
# envelopes fails the timestamp check.
MAX_SENDERS = 4096
# Worker-channel items delivered here, remembered until they expire.
MAX_STORED = 65536


class ReplayGuard:
    """Refuses a sealed envelope seen before, or outside the window (home loop only)."""

    def __init__(self, window: float) -> None:
        self.window = window
        # Per sender: [highest number seen, bitmap of the NUMBER_WINDOW below it, when
        # its last envelope was admitted]. Lists, not objects: one is touched per
        # envelope received.
        self._senders: dict[str, list[Any]] = {}
        self._stored: OrderedDict[tuple[str, int], float] = OrderedDict()

    def admit(self, sender: str, opened: Opened, now: float | None = None) -> str | None:
        """None if the envelope is new and recent; else why it is refused."""
        if now is None:
            now = time.time()
        if abs(now - opened.timestamp) > self.window:
            return "outside the replay window"
        number = opened.number
        seen = self._senders.get(sender)
        if seen is None:
            if len(self._senders) >= MAX_SENDERS:
                self._forget(now)
            self._senders[sender] = [number, 1, now]
            return None
        top = seen[0]
        if number > top:
            shift = number - top
            seen[1] = ((seen[1] << shift) | 1) & _MASK if shift < NUMBER_WINDOW else 1
            seen[0] = number
        else:
            behind = top - number
            if behind >= NUMBER_WINDOW:
                return "replayed (too old)"
            bit = 1 << behind
            if seen[1] & bit:
                return "replayed"
            seen[1] |= bit
        seen[2] = now
        return None

    def _forget(self, now: float) -> None:
        """Make room: senders whose last envelope is older than the window go (a replay
        of any of theirs fails the timestamp check), then, if need be, the oldest."""
        senders = self._senders
        for sender in [s for s, seen in senders.items() if now - seen[2] > self.window]:
            del senders[sender]
        if len(senders) >= MAX_SENDERS:
            oldest = sorted(senders, key=lambda s: senders[s][2])
            for sender in oldest[: len(senders) - MAX_SENDERS + 1]:
                del senders[sender]

    def delivered_stored(self, sender: str, number: int, expires: float) -> bool:
        """Note a stored item (a worker channel's) delivered; False if it was already.

        Stored items outlive the replay window (they wait up to ``expiry``), so they are
        remembered by number until they expire instead.
        """
        now = time.time()
        stored = self._stored
        while stored:
            key, until = next(iter(stored.items()))
            if until >= now and len(stored) < MAX_STORED:
                break
            del stored[key]
        key = (sender, number)
        if key in stored:
            return False
        stored[key] = expires
        return True

    def forget_stored(self, sender: str, number: int) -> None:
        """An item noted by :meth:`delivered_stored` went back to its queue after all."""
        self._stored.pop((sender, number), None)


_MASK = (1 << NUMBER_WINDOW) - 1
