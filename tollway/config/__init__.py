"""Configuration: the entity schema, and loading it from files."""

from tollway.config.loader import load_file, load_text, validate
from tollway.config.schema import GatewayConfig

__all__ = ["GatewayConfig", "load_file", "load_text", "validate"]
