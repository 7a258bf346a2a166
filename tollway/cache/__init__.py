"""The response cache's engine, without the gateway: RFC 9111 rules and the stores.

- `tollway.cache.rfc`: RFC 9111 / 9110 / 5861 / 9211 rules as pure functions on header fields and
  times (storability, freshness, age, request directives, validation, Vary, ranges, invalidation)
- `tollway.cache.entry`: a stored response and its byte encoding (the same bytes in every store)
- `tollway.cache.keys`: cache keys (normalised query, Vary secondary keys)
- `tollway.cache.store`: the `get/put/delete` stores: in-process, node-wide (LMDB file shared by a
  node's workers) and Redis (shared by a cluster)

The plugin that uses them is `tollway.plugins.builtin.proxy_cache`. Nothing here imports the proxy or the
plugins: like `tollway.state`, this package sits at the bottom of the layers.
"""
