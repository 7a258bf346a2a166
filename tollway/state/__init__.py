"""State that outlives a request: node-shared counters (shared memory) and cluster-wide ones (Redis).

- `tollway.state.spec`: `LimitSpec` (a limit) and `Decision` (a check's answer)
- `tollway.state.shared`: the node-wide shared-memory table (created by the supervisor, passed to
  workers by fd) and its robust locks (`tollway.state.locks`, `_shmlock.c`)
- `tollway.state.local`: fixed window, sliding window, GCRA and concurrency on that table
- `tollway.state.redis_client`: a thin asyncio RESP client for one server
- `tollway.state.redis_backends`: the deployments on it (standalone, Sentinel, Cluster) and their URLs
- `tollway.state.redis_health`: whether a backend answers (`RedisBackend.health`), outages and probes
- `tollway.state.scripts`: the same algorithms as Lua scripts
- `tollway.state.limits`: the policies (`local` here, `redis` in redis_policy, `batched` in batched),
  `check_all` and `build_policy`; their counters in `tollway.state.policy_stats`
- `tollway.state.headers`: RateLimit / RateLimit-Policy / X-RateLimit-* / Retry-After and 429 bodies

What a rate-limiting plugin calls (docs/rate-limiting.md has the semantics and accuracy of each)::

    spec = LimitSpec("minute", 300, 60, "sliding", scope=plugin_id)       # per config
    backend = redis_backends.backend_for(url, timeout=0.25)                 # shared per URL
    policy = limits.build_policy(spec, "batched", backend, on_failure="open")
    result = limits.check_all([policy, ...], key, time.time())           # per request
    # -> list[Decision], or an awaitable of one: return it from the access hook
    headers.response_headers(decisions)          # [(b"RateLimit-Policy", ...), (b"RateLimit", ...)]
    headers.denial_body(decisions, request_id)   # (429 or 503, JSON body)
    limits.stats_snapshot()                      # counters for the metrics layer
"""
