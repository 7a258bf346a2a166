"""State that outlives a request: node-shared counters (shared memory) and cluster-wide ones (Redis).

- `tollway.state.spec`: `LimitSpec` (a limit) and `Decision` (a check's answer)
- `tollway.state.shared`: the node-wide shared-memory table and its robust locks
- `tollway.state.local`: fixed window, sliding window, GCRA and concurrency on that table
- `tollway.state.redis_client`: a thin asyncio RESP client (standalone, Sentinel, Cluster)
- `tollway.state.limits`: the policies (`local`, `redis`, `redis` batched) and Redis failure handling
- `tollway.state.headers`: RateLimit / RateLimit-Policy / X-RateLimit-* / Retry-After values

docs/rate-limiting.md describes the semantics and accuracy of each.
"""
