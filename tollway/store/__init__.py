"""The config store: entities in SQLite (embedded) or PostgreSQL (clusters) instead of the config file.

- `model`: entities as rows, writes as operations, validation of a write as a whole (`tollway check`'s);
- `base`: the `ConfigStore` interface; `sqlite`, `postgres`: the backends; `migrations`: their schema;
- `node`: a gateway node's side (boot, watch, catch up, last-known-good, cluster view, /status, metrics);
- `incremental`: applying a change without validating every entity again;
- `cli`: `tollway db …` and `tollway config …`.

Layering: above config (its schema and validation) and plugins (their checks), below runtime, which
asks `node.StoreSource` for configs. Nothing here is imported unless a store is configured.
"""
