"""The base of every configuration model, and the field patterns several sections check against."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]{0,31}$")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}(\.\*)?$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_PARAM = re.compile(r"\{([^{}]*)\}")
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\*?$")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPED_DOT = re.compile(r"%2[eE]")


class Model(BaseModel):
    """Strict, immutable base: unknown keys are errors (a typo must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)
