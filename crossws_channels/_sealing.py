"""Signed (and encrypted) envelopes: ``signing_keys`` and ``encryption_keys``.

A sealed envelope is the ordinary envelope with three keys appended, in this order::

    {"id":...,"msg":{...},"seq":7,"ts":1764680000.123,"n":42,"sig":"1f2e3d4c.<HMAC>"}

``sig`` is the key's id and an HMAC-SHA256, base64url, over every byte before ``,"sig"``:
the envelope as sent, its timestamp ``ts`` and ``n``, a number the sender gives each
envelope it seals. A receiver checks the HMAC before it parses anything else, so forged
traffic costs one hash; then the timestamp must be within ``replay_window`` of its clock
and ``(sender, n)`` new (:class:`ReplayGuard`). Nothing before ``sig`` changes, so a
receiver still recognises its own echo by the prefix without checking it.

With encryption, the message data travels as binary data: a marker, a random nonce and
AES-256-GCM of the data, bound to the sender and topic; the HMAC covers it too. Group and
channel names stay readable (the backplane routes on them); the messages do not.

Keys are derived from each secret (an HMAC of the secret with a fixed label), so a signing
secret and an encryption secret of the same text are different keys.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ENCRYPTED_MARKER", "Key", "Opened", "ReplayGuard", "Sealer", "derive_keys"]

_SIG = ',"sig":"'
_SIG_BYTES = _SIG.encode()
_TS_BYTES = b',"ts":'
_N_BYTES = b',"n":'
_KID_LENGTH = 8
_MAC_LENGTH = 43  # 32 bytes in unpadded base64url
# The tail after ,"sig":" : the key id, a dot, the MAC and the closing "} .
_TAIL_LENGTH = _KID_LENGTH + 1 + _MAC_LENGTH + 2

ENCRYPTED_MARKER = b"\xc1cwE"
"""Starts encrypted data (0xC1 is never the first byte of msgpack or UTF-8)."""
_NONCE_LENGTH = 12
_TEXT, _BINARY = b"t", b"b"


class Unauthenticated(Exception):
    """Why a sealed envelope was refused (a short reason: the report names it)."""


@dataclass(frozen=True, slots=True)
class Key:
    """One secret's keys: its id on the wire, its MAC key, and its cipher if encrypting."""

    kid: bytes
    mac: bytes
    aead: Any = None  # cryptography's AESGCM, when encrypting


@dataclass(frozen=True, slots=True)
class Opened:
    """What the seal of a verified envelope says: the key that signed it, when, and its
    sender's number for it."""

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
        keys.append(Key(kid.encode("ascii"), mac, aead))
    return keys


class Sealer:
    """Seals what this instance sends and opens what it receives (any thread)."""

    def __init__(self, keys: Sequence[Key], *, encrypt: bool) -> None:
        if not keys:
            raise ValueError("no keys")
        self.encrypt = encrypt
        self._signing = keys[0]
        self._keys = {key.kid: key for key in keys}
        self._numbers = itertools.count(1)

    # Sending

    def seal(self, text: str) -> str:
        """``text`` (an envelope) with its timestamp, number and signature appended."""
        key = self._signing
        body = f'{text[:-1]},"ts":{time.time():.3f},"n":{next(self._numbers)}'
        mac = hmac.new(key.mac, body.encode("utf-8"), hashlib.sha256).digest()
        return body + _SIG + key.kid.decode() + "." + _b64(mac) + '"}'

    def encrypt_data(self, sender: str, topic: str, data: str | bytes) -> bytes:
        """``data`` encrypted for the envelope ``sender`` sends on ``topic``."""
        if isinstance(data, str):
            plain = _TEXT + data.encode("utf-8", "surrogatepass")
        else:
            plain = _BINARY + bytes(data)
        nonce = os.urandom(_NONCE_LENGTH)
        sealed: bytes = self._signing.aead.encrypt(nonce, plain, _bound(sender, topic))
        return ENCRYPTED_MARKER + nonce + sealed

    # Receiving

    def open(self, raw: str | bytes) -> Opened:
        """Verify ``raw``'s signature; raise :class:`Unauthenticated` saying why not."""
        data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        at = data.rfind(_SIG_BYTES)
        if at < 0:
            raise Unauthenticated("unsigned")
        tail = data[at + len(_SIG_BYTES) :]
        if len(tail) != _TAIL_LENGTH or tail[_KID_LENGTH : _KID_LENGTH + 1] != b".":
            raise Unauthenticated("malformed signature")
        key = self._keys.get(tail[:_KID_LENGTH])
        if key is None:
            raise Unauthenticated("signed with an unknown key")
        body = data[:at]
        expected = _b64(hmac.new(key.mac, body, hashlib.sha256).digest()).encode("ascii")
        if not hmac.compare_digest(expected, tail[_KID_LENGTH + 1 : -2]):
            raise Unauthenticated("bad signature")
        # Authentic from here on: these were written by a holder of the key.
        ts_at = body.rfind(_TS_BYTES)
        n_at = body.rfind(_N_BYTES)
        try:
            timestamp = float(body[ts_at + len(_TS_BYTES) : n_at])
            number = int(body[n_at + len(_N_BYTES) :])
        except ValueError:
            raise Unauthenticated("malformed seal") from None
        return Opened(key, timestamp, number)

    def decrypt_data(
        self, opened: Opened, sender: str, topic: str, data: str | bytes
    ) -> str | bytes:
        """The data :meth:`encrypt_data` encrypted; raise :class:`Unauthenticated`."""
        if not isinstance(data, bytes) or data[:4] != ENCRYPTED_MARKER:
            raise Unauthenticated("not encrypted")
        aead = opened.key.aead
        if aead is None:
            raise Unauthenticated("not signed with an encryption key")
        nonce = data[4 : 4 + _NONCE_LENGTH]
        try:
            plain: bytes = aead.decrypt(nonce, data[4 + _NONCE_LENGTH :], _bound(sender, topic))
        except Exception:
            raise Unauthenticated("can't be decrypted") from None
        if plain[:1] == _TEXT:
            return plain[1:].decode("utf-8", "surrogatepass")
        return plain[1:]


def _b64(mac: bytes) -> str:
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def _bound(sender: str, topic: str) -> bytes:
    # The ciphertext is bound to who sent it on which topic: moved to another envelope
    # (whose HMAC an attacker can't forge anyway) it would not decrypt.
    return sender.encode("utf-8", "surrogatepass") + b"\0" + topic.encode("utf-8", "surrogatepass")


# Numbers of one sender remembered behind its highest: envelopes overtaking each other by
# more than this are refused (one connection per sender keeps them in order).
NUMBER_WINDOW = 4096
# Senders remembered at once. Only authenticated senders get an entry; an entry whose
# last envelope is older than the replay window can go, since a replay of any of its
# envelopes fails the timestamp check.
MAX_SENDERS = 4096
# Worker-channel items delivered here, remembered until they expire.
MAX_STORED = 65536


@dataclass(slots=True)
class _Seen:
    top: int
    bits: int
    last: float


class ReplayGuard:
    """Refuses a sealed envelope seen before, or outside the window (home loop only)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._senders: OrderedDict[str, _Seen] = OrderedDict()
        self._stored: OrderedDict[tuple[str, int], float] = OrderedDict()

    def admit(self, sender: str, opened: Opened, now: float | None = None) -> str | None:
        """None if the envelope is new and recent; else why it is refused."""
        now = time.time() if now is None else now
        if abs(now - opened.timestamp) > self.window:
            return "outside the replay window"
        number = opened.number
        senders = self._senders
        seen = senders.get(sender)
        if seen is None:
            senders[sender] = _Seen(number, 1, now)
            self._forget(now)
            return None
        if number > seen.top:
            shift = number - seen.top
            seen.bits = ((seen.bits << shift) | 1) & _MASK if shift < NUMBER_WINDOW else 1
            seen.top = number
        else:
            behind = seen.top - number
            if behind >= NUMBER_WINDOW:
                return "replayed (too old)"
            bit = 1 << behind
            if seen.bits & bit:
                return "replayed"
            seen.bits |= bit
        seen.last = now
        senders.move_to_end(sender)
        return None

    def _forget(self, now: float) -> None:
        senders = self._senders
        while senders:
            sender, oldest = next(iter(senders.items()))
            if len(senders) <= MAX_SENDERS and now - oldest.last <= self.window:
                return
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
