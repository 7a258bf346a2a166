"""Session-ticket keys shared by every worker of a node, so a client resumes its TLS session whichever
worker the kernel hands its next connection to (`SO_REUSEPORT` spreads connections over workers).

Python's `ssl` module cannot set ticket keys, so this reaches OpenSSL's ``SSL_CTX_ctrl`` through ctypes
(the same libssl the `_ssl` module is linked to) — hand-written because nothing else offers it. The
``SSL_CTX *`` is the first field after the object header of CPython's ``PySSLContext`` (true of every
CPython 3 release); before writing keys the pointer is checked against two values Python itself reports
(the verify mode and the options), and on anything unexpected the function returns False and the worker
keeps its own keys: resumption then works within a worker only, as without this module.

The supervisor makes the keys (80 random bytes: 16 name, 32 HMAC, 32 AES) and replaces them every
`gateway.tls.ticket_key_rotation`; tickets issued under the previous keys then get a full handshake once.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys

log = logging.getLogger("tollway.tls")

KEY_BYTES = 80
_SET_TICKET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS
_GET_TICKET_KEYS = 58  # SSL_CTRL_GET_TLSEXT_TICKET_KEYS
# Python's verify modes as OpenSSL flags (CERT_REQUIRED is SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT)
_VERIFY_FLAGS = {ssl.CERT_NONE: 0, ssl.CERT_OPTIONAL: 1, ssl.CERT_REQUIRED: 3}
_lib: ctypes.CDLL | None = None


def _libssl() -> ctypes.CDLL | None:
    global _lib
    if _lib is None:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)  # symbols resolve to the libssl _ssl uses
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        lib.SSL_CTX_get_verify_mode.restype = ctypes.c_int
        lib.SSL_CTX_get_verify_mode.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


def set_ticket_keys(context: ssl.SSLContext, keys: bytes) -> bool:
    """Make `context` encrypt and decrypt session tickets with `keys`; False if it cannot be done here."""
    if len(keys) != KEY_BYTES or sys.implementation.name != "cpython":
        return False
    try:
        lib = _libssl()
        if lib is None:
            return False
        pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
        if not pointer:
            return False
        # The pointer must be the context Python describes; OpenSSL's option bits are a 64-bit word that
        # Python reads the same way, so a wrong pointer cannot pass both checks.
        if lib.SSL_CTX_get_verify_mode(pointer) != _VERIFY_FLAGS[context.verify_mode]:
            return False
        if lib.SSL_CTX_get_options(pointer) != int(context.options):
            return False
        buffer = ctypes.create_string_buffer(keys, KEY_BYTES)
        if lib.SSL_CTX_ctrl(pointer, _SET_TICKET_KEYS, KEY_BYTES, buffer) != 1:
            return False
        check = ctypes.create_string_buffer(KEY_BYTES)
        return lib.SSL_CTX_ctrl(pointer, _GET_TICKET_KEYS, KEY_BYTES, check) == 1 and check.raw == keys
    except (OSError, AttributeError, ValueError) as exc:  # no such symbol, no libssl
        log.warning("session-ticket keys cannot be shared between workers here: %s", exc)
        return False
