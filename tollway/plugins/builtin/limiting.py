"""What the two limit plugins (`rate-limiting`, `concurrency-limit`) share: their common options
(`LimitPluginConfig`). The per-request half — the key a request is counted under (`KeyBuilder`) and
what becomes of a decision (`LimitAnswers`: RateLimit headers, the 429/503, the decision metrics) — is
compiled, in `limit_check` (the key parts are described there).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from tollway.plugins.base import HeaderName, PluginConfig
from tollway.plugins.builtin.limit_check import KEY_PARTS, KeyBuilder, LimitAnswers
from tollway.state.spec import LimitSpec

__all__ = ["KEY_PARTS", "HeaderSettings", "KeyBuilder", "LimitAnswers", "LimitPluginConfig", "answers_for"]

KeyPart = Literal["consumer", "credential", "ip", "header", "path", "route", "service"]


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


KeyParts = Annotated[list[KeyPart], BeforeValidator(_as_list)]


class HeaderSettings(PluginConfig):
    ietf: bool = Field(True, description="send the IETF RateLimit and RateLimit-Policy fields")
    legacy: bool = Field(False, description="send X-RateLimit-Limit, -Remaining and -Reset")
    per_limit: bool = Field(
        False, description="with `legacy`: also X-RateLimit-Limit-<Name> and X-RateLimit-Remaining-<Name>"
    )


class LimitPluginConfig(PluginConfig):
    """The options every limit plugin has: the key, the headers, the counters' scope."""

    key: KeyParts = Field(
        ["consumer"],
        description="what is counted separately: one or more of consumer, credential, ip, header, path, "
        "route, service (joined); a part the request lacks falls back to the client IP",
    )
    header_name: HeaderName | None = Field(None, description="the request header of the `header` key part")
    headers: HeaderSettings = Field(default_factory=HeaderSettings, description="response headers sent")
    status: int = Field(429, ge=400, le=599, description="status of a refusal over the limit")
    message: str = Field(
        "rate limit exceeded", min_length=1, max_length=200, description="message of a refusal over the limit"
    )
    scope: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._:-]{1,64}$",
        description="counts belong to the plugin instance (where it is attached); instances with the same "
        "scope share them",
    )

    @model_validator(mode="after")
    def _header_part_named(self) -> LimitPluginConfig:
        if "header" in self.key and not self.header_name:
            raise ValueError("the `header` key part needs `header_name`")
        return self


def answers_for(plugin: str, specs: list[LimitSpec], config: LimitPluginConfig) -> LimitAnswers:
    """The plugin's `LimitAnswers` from its options (built once per config)."""
    h = config.headers
    return LimitAnswers(plugin, specs, h.ietf, h.legacy, h.per_limit, config.status, config.message)
