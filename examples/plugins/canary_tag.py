"""canary-tag: an example user plugin — tags each request for a canary or the stable lane.

A share of callers (`percent`) is tagged "canary", the rest "stable", in a request header the backend
(or a routing layer behind it) reads. The choice is sticky: it hashes the consumer's username when
the request is authenticated, else the client address, so a caller stays in one lane.

Load it by import path, no packaging needed (the module must be importable, e.g. on PYTHONPATH):

    plugins:
      - name: tollway.examples.plugins.canary_tag:CanaryTag
        config: {percent: 5}
"""

from __future__ import annotations

import zlib
from typing import Literal

from pydantic import Field

from tollway.plugins import HeaderName, Plugin, PluginConfig, PluginContext, RequestContext


class CanaryConfig(PluginConfig):
    header: HeaderName = Field("X-Canary", description="request header carrying the lane")
    percent: float = Field(10.0, ge=0, le=100, description="share of callers sent to the canary lane")
    sticky_by: Literal["consumer", "client-ip"] = Field(
        "consumer", description="what keeps a caller in its lane (consumer falls back to client-ip)"
    )
    echo: bool = Field(True, description="tell the client its lane in the response too")


class CanaryTag(Plugin[CanaryConfig]):
    name = "canary-tag"
    priority = 900  # transformation band: after authentication, so the consumer is known

    def __init__(self, config: CanaryConfig, context: PluginContext) -> None:
        super().__init__(config, context)
        self.threshold = int(config.percent * 100)  # out of 10,000 buckets

    def access(self, ex: RequestContext) -> None:
        consumer = ex.consumer
        if self.config.sticky_by == "consumer" and consumer is not None:
            key = consumer.username
        else:
            key = ex.client_ip
        lane = "canary" if zlib.crc32(key.encode()) % 10_000 < self.threshold else "stable"
        ex.set_header(self.config.header, lane)  # replaces whatever the client sent
        if self.config.echo:
            ex.set_response_header(self.config.header, lane)
