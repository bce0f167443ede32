"""The Lua scripts of :class:`~mappingstore.RedisStore` (no I/O here).

Layout (see ``docs/backends/redis.md``): a namespace is split into 16 *buckets*; bucket
``b`` of namespace ``ns`` owns three kinds of keys that share one hash tag, so they always
live in one cluster slot and one script may touch them together::

    ms:{<esc(ns)>:<bb>}:k:<key>   the record (a Redis string, native PXAT expiry)
    ms:{<esc(ns)>:<bb>}:i         index: sorted set of the bucket's keys, all scores 0
                                  (lexicographic order, so prefix ranges are O(log n))
    ms:{<esc(ns)>:<bb>}:x         expiries: sorted set key -> PXAT milliseconds, holding
                                  only keys that have an expiry (a subset of the index)
    ms:{<esc(ns)>:<bb>}:c         counters: ZCARD(I) + ZCARD(X) * 2^32, an integer
                                  string (absent when 0, i.e. when the bucket is empty)

Every script receives bucket index keys as (I, X) pairs. Scripts compute "now" with the
server's ``TIME`` so that counts agree with the server's own expiry of the records; an
index entry whose expiry score is below now is dead (Redis expires a key when
``now > at``). Scripts never use ``KEYS``/``SCAN``. Record keys are derived inside a script
from the bucket's index key (same hash tag, hence same slot, which Redis Cluster allows).

The counters exist for ``len()``: on a standalone server it is one ``MGET`` of the 16
counters of a namespace (one native command, no script) when no bucket has an expiring
key (every counter below 2^32), and the COUNT script only otherwise. Every script that
adds to or removes from an index or expiry set adjusts its bucket's counter in the same
script (atomically), from the replies of ``ZADD``/``ZREM`` (which count what really
changed); the counter's name is derived from the index key, like record keys. Packing
both counts in one integer halves the keys ``len()`` reads; it is exact while a bucket
holds fewer than 2^32 keys and one script changes fewer than 2^21 expiries of a bucket
(Lua numbers are doubles: 2^53), far beyond what a request (512 MB at most) can carry.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

__all__ = [
    "APPLY",
    "CAS",
    "CLEAR",
    "COUNT",
    "DELETE",
    "GAPPLY",
    "GETREC",
    "ITER",
    "PURGE",
    "PUT",
    "Script",
]


@dataclass(frozen=True)
class Script:
    """A Lua script and its SHA1 (EVALSHA first, EVAL when the server lacks it)."""

    name: str
    source: bytes
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source).hexdigest())


_PRELUDE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- Add dn index entries and de expiry entries to the bucket's counter (its name derived
-- from I: same hash tag); the counter is deleted when the bucket becomes empty.
local function counted(I, dn, de)
  local d = dn + de * 4294967296
  if d ~= 0 then
    local C = string.sub(I, 1, -2) .. 'c'
    local n = redis.pcall('INCRBY', C, d)
    if type(n) == 'table' then
      -- A foreign value (not an integer): the counter only caches the index, which this
      -- script has already changed, so rebuild it from there instead of failing a write
      -- that is applied.
      local X = string.sub(I, 1, -2) .. 'x'
      n = redis.call('ZCARD', I) + redis.call('ZCARD', X) * 4294967296
      if n > 0 then redis.call('SET', C, string.format('%d', n)) end
    end
    if n <= 0 then redis.call('DEL', C) end
  end
end
-- Drop dead index entries, bounded, and only once enough have piled up: keeps a
-- TTL-heavy namespace's index small without making every write pay for it.
local function prune(I, X, now)
  if redis.call('ZCOUNT', X, '-inf', '(' .. now) < 64 then return end
  local dead = redis.call('ZRANGEBYSCORE', X, '-inf', '(' .. now, 'LIMIT', 0, 256)
  local de = redis.call('ZREM', X, unpack(dead))
  counted(I, -redis.call('ZREM', I, unpack(dead)), -de)
end
-- Call cmd(key, list[i..j]) in slices (Lua's unpack is limited to a few thousand values);
-- returns the sum of the integer replies.
local function sliced(cmd, key, list)
  local n = #list
  local i = 1
  local sum = 0
  while i <= n do
    local j = math.min(i + 999, n)
    local r
    if key then
      r = redis.call(cmd, key, unpack(list, i, j))
    else
      r = redis.call(cmd, unpack(list, i, j))
    end
    if type(r) == 'number' then sum = sum + r end
    i = j + 1
  end
  return sum
end
"""


def _script(name: str, body: str) -> Script:
    return Script(name, (_PRELUDE + body).encode("ascii"))


#: KEYS: I, X, D. ARGV: member, data, px ('' = no expiry, else milliseconds > 0).
PUT = _script(
    "put",
    """
local I, X, D = KEYS[1], KEYS[2], KEYS[3]
local m, px = ARGV[1], ARGV[3]
if px == '' then
  redis.call('SET', D, ARGV[2])
  local dn = redis.call('ZADD', I, 0, m)
  local de = 0
  if redis.call('EXISTS', X) == 1 then
    de = -redis.call('ZREM', X, m)
    prune(I, X, now_ms())
  end
  counted(I, dn, de)
else
  local now = now_ms()
  local at = now + tonumber(px)
  redis.call('SET', D, ARGV[2], 'PXAT', string.format('%d', at))
  local de = redis.call('ZADD', X, at, m)
  counted(I, redis.call('ZADD', I, 0, m), de)
  prune(I, X, now)
end
return 1
""",
)

#: KEYS: I, X, D. ARGV: member. Returns 1 if a live record was deleted.
DELETE = _script(
    "delete",
    """
local live = redis.call('EXISTS', KEYS[3])
if live == 1 then redis.call('DEL', KEYS[3]) end
local dn = redis.call('ZREM', KEYS[1], ARGV[1])
counted(KEYS[1], -dn, -redis.call('ZREM', KEYS[2], ARGV[1]))
return live
""",
)

#: KEYS: D. Returns nil or {data, pttl, pexpiretime}. A data key another program set to
#: another Redis type reads as the empty record, which no decoder accepts
#: (CorruptValueError), as the GET and ITER paths do.
GETREC = _script(
    "getrec",
    """
local v = redis.pcall('GET', KEYS[1])
if not v then return false end
if type(v) == 'table' then v = '' end
return {v, redis.call('PTTL', KEYS[1]), redis.call('PEXPIRETIME', KEYS[1])}
""",
)

#: Compare-and-set of one record. KEYS: I, X, D. ARGV: member, expect ('0' missing,
#: '1' present), expected data, expected pexpiretime (-1: none), new px ('D' delete,
#: 'K' keep the expiry, '' none, else ms > 0), new data. Returns {2} when written; on a
#: conflict the current record, so the caller retries without another read: {0} when
#: missing, {1, data, pttl, pexpiretime} when present.
CAS = _script(
    "cas",
    """
local I, X, D = KEYS[1], KEYS[2], KEYS[3]
local m = ARGV[1]
local cur = redis.pcall('GET', D)
if type(cur) == 'table' then cur = '' end  -- another Redis type: the empty (corrupt) record
local at = -1
if cur then at = redis.call('PEXPIRETIME', D) end
if ARGV[2] == '0' then
  if cur then return {1, cur, redis.call('PTTL', D), at} end
elseif (not cur) or cur ~= ARGV[3] or at ~= tonumber(ARGV[4]) then
  if not cur then return {0} end
  return {1, cur, redis.call('PTTL', D), at}
end
local px = ARGV[5]
if px == 'D' then
  redis.call('DEL', D)
  local dn = redis.call('ZREM', I, m)
  counted(I, -dn, -redis.call('ZREM', X, m))
elseif px == 'K' then
  redis.call('SET', D, ARGV[6], 'KEEPTTL')
  counted(I, redis.call('ZADD', I, 0, m), 0)
elseif px == '' then
  redis.call('SET', D, ARGV[6])
  local dn = redis.call('ZADD', I, 0, m)
  counted(I, dn, -redis.call('ZREM', X, m))
else
  local at = now_ms() + tonumber(px)
  redis.call('SET', D, ARGV[6], 'PXAT', string.format('%d', at))
  local de = redis.call('ZADD', X, at, m)
  counted(I, redis.call('ZADD', I, 0, m), de)
end
return {2}
""",
)

# The writes of APPLY and GAPPLY: apply_groups(k0, a) writes the (I, X) pairs of KEYS from
# index k0 on, their arguments starting at ARGV[a] (the format APPLY describes).
_APPLY_GROUPS = """
local function apply_groups(k0, a)
  local now = now_ms()
  for k = k0, #KEYS - 1, 2 do
    local I, X = KEYS[k], KEYS[k + 1]
    local base = string.sub(I, 1, -2) .. 'k:'
    local np, nq = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    a = a + 2
    local hasx = redis.call('EXISTS', X) == 1
    local dn, de = 0, 0
    if np > 0 then
      local mset, zadd, ms = {}, {}, {}
      for i = 0, np - 1 do
        local m = ARGV[a + 2 * i]
        mset[#mset + 1] = base .. m
        mset[#mset + 1] = ARGV[a + 2 * i + 1]
        zadd[#zadd + 1] = 0
        zadd[#zadd + 1] = m
        ms[#ms + 1] = m
      end
      a = a + 2 * np
      sliced('MSET', false, mset)
      dn = dn + sliced('ZADD', I, zadd)
      if hasx then de = de - sliced('ZREM', X, ms) end
    end
    if nq > 0 then
      local gone, dkeys = {}, {}
      for i = 0, nq - 1 do
        local m, v, px = ARGV[a + 3 * i], ARGV[a + 3 * i + 1], ARGV[a + 3 * i + 2]
        if px == 'D' then
          gone[#gone + 1] = m
          dkeys[#dkeys + 1] = base .. m
        else
          local at = now + tonumber(px)
          redis.call('SET', base .. m, v, 'PXAT', string.format('%d', at))
          de = de + redis.call('ZADD', X, at, m)
          dn = dn + redis.call('ZADD', I, 0, m)
          hasx = true
        end
      end
      a = a + 3 * nq
      if #gone > 0 then
        sliced('DEL', false, dkeys)
        dn = dn - sliced('ZREM', I, gone)
        if hasx then de = de - sliced('ZREM', X, gone) end
      end
    end
    counted(I, dn, de)
    if hasx then prune(I, X, now) end
  end
end
"""

#: Atomic multi-key write. KEYS: nb (I, X) pairs. ARGV: for each pair in order: the
#: number of plain puts p and of other ops q, then p (member, data) pairs (no expiry),
#: then q (member, data, px) triples (px 'D' deletes, else ms > 0). Record keys are
#: derived from the index key (same hash tag), which keeps the request small.
APPLY = _script("apply", _APPLY_GROUPS + "apply_groups(1, 1)\nreturn 1\n")

#: APPLY behind guards: the write of a batch whose read-modify-writes read records, which
#: must still be what they read (else another client's update would be overwritten).
#: KEYS: ng guarded record keys (D), then nb (I, X) pairs as for APPLY. ARGV: ng, then per
#: guard an expectation ('0' missing, '1' present) and the expected data, then APPLY's
#: arguments. A record that expired, as for every read, is missing; one set by another
#: program to another Redis type is the empty record (as GETREC reads it). Returns 0 when
#: written, else the number (from 1) of the first guard that failed, and nothing is
#: written. With no (I, X) pair it only checks the guards (a read).
GAPPLY = _script(
    "gapply",
    _APPLY_GROUPS
    + """
local ng = tonumber(ARGV[1])
for g = 1, ng do
  local cur = redis.pcall('GET', KEYS[g])
  if type(cur) == 'table' then cur = '' end
  if ARGV[2 * g] == '0' then
    if cur then return g end
  elseif (not cur) or cur ~= ARGV[2 * g + 1] then
    return g
  end
end
if #KEYS > ng then apply_groups(ng + 1, 2 * ng + 2) end
return 0
""",
)

#: Live record count. KEYS: (I, X) pairs.
COUNT = _script(
    "count",
    """
local n = 0
local xs = {}
for i = 1, #KEYS, 2 do
  n = n + redis.call('ZCARD', KEYS[i])
  xs[#xs + 1] = KEYS[i + 1]
end
-- Most namespaces hold no expiring key: one EXISTS then spares a ZCOUNT per bucket.
if redis.call('EXISTS', unpack(xs)) > 0 then
  local now = now_ms()
  for i = 1, #xs do
    n = n - redis.call('ZCOUNT', xs[i], '-inf', '(' .. now)
  end
end
return n
""",
)

#: One chunk of a lexicographic walk over the buckets. KEYS: (I, X) pairs. ARGV: pair
#: index to start at, member to start after ('' = range start), range start, range end,
#: limit, '1' to return values. Returns {next pair index (0 = done), last member, items}
#: where items are members (and values) of live records.
ITER = _script(
    "iter",
    """
local b = tonumber(ARGV[1])
local after, lo, hi = ARGV[2], ARGV[3], ARGV[4]
local limit = tonumber(ARGV[5])
local wantv = ARGV[6] == '1'
local nb = #KEYS / 2
local now = now_ms()
local out = {0, ''}
local scanned = 0
while b <= nb do
  local I, X = KEYS[2 * b - 1], KEYS[2 * b]
  local start = lo
  if after ~= '' then start = '(' .. after end
  local want = limit - scanned
  local ms = redis.call('ZRANGEBYLEX', I, start, hi, 'LIMIT', 0, want)
  local nm = #ms
  if nm > 0 then
    local base = string.sub(I, 1, -2) .. 'k:'
    if wantv then
      local ks = {}
      for j = 1, nm do ks[j] = base .. ms[j] end
      local vs = redis.call('MGET', unpack(ks))
      for j = 1, nm do
        if vs[j] then
          out[#out + 1] = ms[j]
          out[#out + 1] = vs[j]
        elseif redis.call('TYPE', ks[j]).ok ~= 'none' then
          -- Listed, and set by another program to another Redis type (MGET reads it as
          -- nil): the empty record, which no decoder accepts, not a silent gap.
          out[#out + 1] = ms[j]
          out[#out + 1] = ''
        end
      end
    elseif redis.call('EXISTS', X) == 1 then
      local sc = redis.call('ZMSCORE', X, unpack(ms))
      for j = 1, nm do
        if (not sc[j]) or tonumber(sc[j]) >= now then out[#out + 1] = ms[j] end
      end
    else
      for j = 1, nm do out[#out + 1] = ms[j] end
    end
    scanned = scanned + nm
  end
  if nm < want then
    b = b + 1
    after = ''
  else
    out[1] = b
    out[2] = ms[nm]
    return out
  end
end
return out
""",
)

#: Delete up to ARGV[1] records of the buckets. KEYS: (I, X) pairs. Returns how many.
CLEAR = _script(
    "clear",
    """
local limit = tonumber(ARGV[1])
local removed = 0
for i = 1, #KEYS, 2 do
  local I, X = KEYS[i], KEYS[i + 1]
  local base = string.sub(I, 1, -2) .. 'k:'
  while removed < limit do
    local ms = redis.call('ZRANGEBYLEX', I, '-', '+', 'LIMIT', 0, math.min(1000, limit - removed))
    if #ms == 0 then break end
    local ks = {}
    for j = 1, #ms do ks[j] = base .. ms[j] end
    redis.call('DEL', unpack(ks))
    local dn = redis.call('ZREM', I, unpack(ms))
    counted(I, -dn, -redis.call('ZREM', X, unpack(ms)))
    removed = removed + #ms
  end
end
return removed
""",
)

#: Remove the index entries of expired records. KEYS: (I, X) pairs. Returns how many.
PURGE = _script(
    "purge",
    """
local now = now_ms()
local n = 0
for i = 1, #KEYS, 2 do
  local I, X = KEYS[i], KEYS[i + 1]
  while true do
    local dead = redis.call('ZRANGEBYSCORE', X, '-inf', '(' .. now, 'LIMIT', 0, 1000)
    if #dead == 0 then break end
    local de = redis.call('ZREM', X, unpack(dead))
    counted(I, -redis.call('ZREM', I, unpack(dead)), -de)
    n = n + #dead
  end
end
return n
""",
)
