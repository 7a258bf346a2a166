"""Lua scripts for the Redis policies: the same arithmetic as tollway.state.local, atomic on the server.

Every script touches one key (KEYS[1]), so it runs unchanged on Redis Cluster; the key carries the
limit's hash tag. Time is the server's (`TIME`), so every gateway node sees the same windows whatever
its own clock says; tests pass `now` explicitly instead.

take (fixed / sliding / gcra) — ARGV: p1, p2, want, partial, now
    fixed, sliding: p1 = limit, p2 = window seconds;  gcra: p1 = interval (window/limit), p2 = capacity
    partial = 0: all `want` units or none (the `redis` policy: one call per request)
    partial = 1: grant up to `want`, but never more than half of what is left (the batched policy:
                 a node reserving a slice leaves room for the others, so the last units of a window
                 go out in ever smaller slices)
    returns {granted, remaining, reset_after_us, retry_after_us, window_id}
        remaining       units left after this grant (cluster-wide)
        reset_after_us  fixed/sliding: until the window ends; gcra: until the bucket is full again
        retry_after_us  0 if granted, else until `want` units could be granted
        window_id       fixed/sliding: the window the units belong to (give back names it); gcra: 0

    retry_after_us is for `want` units (partial: for one unit).

give back — ARGV: p1, p2, units, window_id, now: return unused units of a slice (never below zero, never
to a window that has ended). Replies with the units actually returned.
"""

from __future__ import annotations

from tollway.state.redis_client import Script

_CLOCK = """
local function clock(arg)
  local now = tonumber(arg)
  if now then return now end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function grant_of(want, free, partial)
  if free < 1 then return 0 end
  if partial then
    local half = math.ceil(free / 2)
    if want < half then return want end
    return half
  end
  if want <= free then return want end
  return 0
end
local function us(seconds)
  if seconds <= 0 then return 0 end
  return math.ceil(seconds * 1000000)
end
"""

FIXED_TAKE = Script(
    _CLOCK
    + """
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local want, partial = tonumber(ARGV[3]), ARGV[4] == '1'
local now = clock(ARGV[5])
local wid = math.floor(now / window)
local state = redis.call('HMGET', KEYS[1], 'w', 'c')
local count = 0
local stored = tonumber(state[1])
if stored and stored >= wid then
  wid = stored
  count = tonumber(state[2]) or 0
end
local reset = (wid + 1) * window - now
local grant = grant_of(want, limit - count, partial)
if grant > 0 then
  count = count + grant
  redis.call('HSET', KEYS[1], 'w', wid, 'c', count)
  redis.call('PEXPIRE', KEYS[1], math.ceil(reset * 1000) + 1000)
end
local retry = 0
if grant == 0 then retry = reset end
return {grant, math.max(0, limit - count), us(reset), us(retry), wid}
""",
    "fixed-take",
)

FIXED_GIVE = Script(
    """
local units, wid = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'w', 'c')
if tonumber(state[1]) ~= wid then return 0 end
local count = tonumber(state[2]) or 0
if units > count then units = count end
redis.call('HSET', KEYS[1], 'c', count - units)
return units
""",
    "fixed-give",
)

SLIDING_TAKE = Script(
    _CLOCK
    + """
local limit, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local want, partial = tonumber(ARGV[3]), ARGV[4] == '1'
local now = clock(ARGV[5])
local wid = math.floor(now / window)
local state = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local cur, prev = 0, 0
local stored = tonumber(state[1])
if stored then
  if stored >= wid then
    wid = stored
    cur = tonumber(state[2]) or 0
    prev = tonumber(state[3]) or 0
  elseif stored == wid - 1 then
    prev = tonumber(state[2]) or 0
  end
end
local start = wid * window
local elapsed = math.max(0, now - start)
local weight = 1 - elapsed / window
local estimate = prev * weight + cur
local grant = grant_of(want, math.floor(limit - estimate + 1e-9), partial)
if grant > 0 then
  cur = cur + grant
  estimate = estimate + grant
  redis.call('HSET', KEYS[1], 'w', wid, 'c', cur, 'p', prev)
  redis.call('PEXPIRE', KEYS[1], math.ceil((start + 2 * window - now) * 1000) + 1000)
end
local retry = 0
if grant == 0 then
  -- when the estimate leaves room for `need` units, if nothing else is admitted meanwhile
  local need = want
  if partial then need = 1 end
  if need > limit then
    retry = 2 * window
  elseif cur + need <= limit and prev > 0 then
    retry = math.max(0, window * (1 - (limit - cur - need) / prev) - elapsed)
  else
    local y = 0
    if cur > 0 then y = math.max(0, window * (1 - (limit - need) / cur)) end
    retry = (window - elapsed) + y
  end
end
return {grant, math.max(0, math.floor(limit - estimate + 1e-9)), us(start + window - now), us(retry), wid}
""",
    "sliding-take",
)

SLIDING_GIVE = Script(
    """
local units, wid = tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 'w', 'c', 'p')
local stored = tonumber(state[1])
local field
if stored == wid then field = 'c' elseif stored == wid + 1 then field = 'p' else return 0 end
local value = tonumber(state[field == 'c' and 2 or 3]) or 0
if units > value then units = value end
redis.call('HSET', KEYS[1], field, value - units)
return units
""",
    "sliding-give",
)

# GCRA keeps its TAT in units of `interval` (a hash {u: TAT units, i: interval}): spending a unit adds
# exactly 1, where adding the interval in seconds to a 1.7e9 timestamp would pile up rounding. A changed
# interval (a config reload) rescales. Numbers are written with %.17g: Lua's default keeps 14 digits.
GCRA_TAKE = Script(
    _CLOCK
    + """
local interval, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local want, partial = tonumber(ARGV[3]), ARGV[4] == '1'
local now = clock(ARGV[5])
local now_u = now / interval
local state = redis.call('HMGET', KEYS[1], 'u', 'i')
local tat = now_u
local stored = tonumber(state[1])
if stored then
  local counted = tonumber(state[2])
  if counted and counted ~= interval then stored = stored * counted / interval end
  if stored > now_u then tat = stored end
end
local free = math.floor(capacity - (tat - now_u) + 1e-6)
local grant = grant_of(want, free, partial)
if grant > 0 then
  tat = tat + grant
  redis.call('HSET', KEYS[1], 'u', string.format('%.17g', tat), 'i', string.format('%.17g', interval))
  redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now_u) * interval * 1000) + 1000)
end
local retry = 0
if grant == 0 then
  local need = want
  if partial then need = 1 end
  if need > capacity then retry = 2 * capacity * interval
  else retry = (tat + need - capacity - now_u) * interval end
end
return {grant, math.max(0, free - grant), us((tat - now_u) * interval), us(retry), 0}
""",
    "gcra-take",
)

GCRA_GIVE = Script(
    _CLOCK
    + """
local interval, units = tonumber(ARGV[1]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'u', 'i')
local stored = tonumber(state[1])
if not stored then return 0 end
local counted = tonumber(state[2])
if counted and counted ~= interval then stored = stored * counted / interval end
local now_u = clock(ARGV[5]) / interval
local tat = stored - units
if tat <= now_u then
  redis.call('DEL', KEYS[1])
  return units
end
redis.call('HSET', KEYS[1], 'u', string.format('%.17g', tat), 'i', string.format('%.17g', interval))
redis.call('PEXPIRE', KEYS[1], math.ceil((tat - now_u) * interval * 1000) + 1000)
return units
""",
    "gcra-give",
)

TAKE = {"fixed": FIXED_TAKE, "sliding": SLIDING_TAKE, "gcra": GCRA_TAKE}
GIVE = {"fixed": FIXED_GIVE, "sliding": SLIDING_GIVE, "gcra": GCRA_GIVE}
