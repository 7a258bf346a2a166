"""Tollway: an API gateway in Python."""

__version__ = "0.1.0"
