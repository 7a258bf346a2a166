"""Counters that every layer bumps: plain in-process metrics (metrics.py) and their catalogue
(catalog.py). Low in the layers and importing nothing else of ours, so routing, upstreams and plugins
can count without depending on tollway.observability, which records and exposes them."""
