"""Password hashes for basic-auth: only slow, salted hashes are accepted, checked in constant time.

Formats (what `tollway hash-password` writes, and what common tools produce):
  bcrypt         ``$2b$12$...`` (also $2a$, $2y$; htpasswd -B)            cost >= 10
  argon2         ``$argon2id$v=19$m=65536,t=3,p=4$...`` (needs argon2-cffi)  t >= 1, m >= 19456 KiB
  PBKDF2-SHA256  ``$pbkdf2-sha256$600000$<salt>$<hash>`` (passlib's format)  rounds >= 100,000

Checking costs tens of milliseconds by design, so basic-auth runs checks in a thread and caches
successes briefly; nothing here is called on the event loop per request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from collections.abc import Callable

_BCRYPT = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
_ARGON2 = re.compile(r"^\$argon2(id|i|d)\$v=\d+\$m=(\d+),t=(\d+),p=(\d+)\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$")
_PBKDF2 = re.compile(r"^\$pbkdf2-sha256\$(\d+)\$([./A-Za-z0-9]+)\$([./A-Za-z0-9]+)$")
SCHEMES = ("bcrypt", "argon2", "pbkdf2-sha256")
MIN_BCRYPT_COST = 10
MIN_PBKDF2_ROUNDS = 100_000
MIN_ARGON2_MEMORY = 19456  # KiB: OWASP's minimum for argon2id

Verifier = Callable[[bytes], bool]


def check_hash(value: str) -> str:
    """Validate a stored hash (format and strength); ValueError says what is wrong."""
    if m := _BCRYPT.match(value):
        if int(m.group(1)) < MIN_BCRYPT_COST:
            raise ValueError(f"bcrypt cost {m.group(1)} is too low (at least {MIN_BCRYPT_COST})")
        _require("bcrypt", "bcrypt")
    elif m := _ARGON2.match(value):
        if int(m.group(2)) < MIN_ARGON2_MEMORY or int(m.group(3)) < 1:
            raise ValueError(f"argon2 parameters are too weak (m >= {MIN_ARGON2_MEMORY} KiB, t >= 1)")
        _require("argon2", "argon2-cffi")
    elif m := _PBKDF2.match(value):
        if int(m.group(1)) < MIN_PBKDF2_ROUNDS:
            raise ValueError(f"PBKDF2 rounds {m.group(1)} are too few (at least {MIN_PBKDF2_ROUNDS:,})")
    else:
        raise ValueError(
            "not a supported password hash (bcrypt $2b$..., argon2 $argon2id$..., or $pbkdf2-sha256$...); "
            "create one with: tollway hash-password"
        )
    return value


def verifier(stored: str) -> Verifier:
    """A constant-time check of a password against `stored` (already validated by `check_hash`)."""
    if stored.startswith("$2"):
        import bcrypt

        hashed = stored.encode("ascii")
        return lambda password: bcrypt.checkpw(password, hashed)
    if stored.startswith("$argon2"):
        from argon2 import PasswordHasher
        from argon2.exceptions import VerificationError

        hasher = PasswordHasher()

        def check_argon2(password: bytes) -> bool:
            try:
                return hasher.verify(stored, password)
            except VerificationError:
                return False

        return check_argon2
    m = _PBKDF2.match(stored)
    assert m is not None
    rounds, salt, expected = int(m.group(1)), _ab64_decode(m.group(2)), _ab64_decode(m.group(3))

    def check_pbkdf2(password: bytes) -> bool:
        actual = hashlib.pbkdf2_hmac("sha256", password, salt, rounds, len(expected))
        return hmac.compare_digest(actual, expected)

    return check_pbkdf2


def hash_password(password: str, scheme: str = "bcrypt") -> str:
    """A new salted hash of `password` (`tollway hash-password`)."""
    data = password.encode("utf-8")
    if scheme == "bcrypt":
        import bcrypt

        if len(data) > 72:
            raise ValueError("bcrypt uses only the first 72 bytes of a password; use argon2 or pbkdf2-sha256")
        return bcrypt.hashpw(data, bcrypt.gensalt(12)).decode("ascii")
    if scheme == "argon2":
        _require("argon2", "argon2-cffi")
        from argon2 import PasswordHasher

        return PasswordHasher().hash(data)
    if scheme == "pbkdf2-sha256":
        rounds, salt = 600_000, os.urandom(16)
        digest = hashlib.pbkdf2_hmac("sha256", data, salt, rounds)
        return f"$pbkdf2-sha256${rounds}${_ab64_encode(salt)}${_ab64_encode(digest)}"
    raise ValueError(f"unknown scheme {scheme!r}; one of {', '.join(SCHEMES)}")


def _require(module: str, package: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise ValueError(f"this hash needs the {package!r} package: pip install {package}") from exc


def _ab64_encode(data: bytes) -> str:
    """passlib's "adapted base64": '.' for '+', no padding."""
    return base64.b64encode(data).decode("ascii").replace("+", ".").rstrip("=")


def _ab64_decode(text: str) -> bytes:
    text = text.replace(".", "+")
    return base64.b64decode(text + "=" * (-len(text) % 4))
