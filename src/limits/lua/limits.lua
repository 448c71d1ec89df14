-- tollgate rate limiter: one atomic check-and-charge ("admit"), settlement ("settle") or read
-- ("peek") of every limit of up to a few scopes, on Redis's own clock (TIME), never the caller's.
-- Mirrors src/limits/bucket.rs (GCRA) and src/limits/calendar.rs (days/months) number for number.
--
-- KEYS[i]: state prefix of scope i ("tg:rl:k:<key id>" or "tg:rl:a:<account id>").
-- ARGV: mode, request id, tokens, cost (micro-USD), lease ms, day, month, tokens delta, cost delta,
--       n offsets, (from_ms, offset_ms) * n, then per scope 8 numbers: scope kind, 7 limits (-1 = none).
local P = 60000
local DAY = 86400000
local function S(x) return string.format('%.0f', x) end
local function idiv(a, b) return math.floor(a / b) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + idiv(tonumber(t[2]), 1000)

local mode = ARGV[1]
local rid = ARGV[2]
local tokens = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local lease = tonumber(ARGV[5])
local s_day = tonumber(ARGV[6])
local s_month = tonumber(ARGV[7])
local d_tokens = tonumber(ARGV[8])
local d_cost = tonumber(ARGV[9])
local no = tonumber(ARGV[10])
local a = 11
local offs = {}
for i = 1, no do
  offs[i] = {tonumber(ARGV[a]), tonumber(ARGV[a + 1])}
  a = a + 2
end
local scopes = {}
for i = 1, #KEYS do
  local lim = {}
  for k = 1, 7 do lim[k] = tonumber(ARGV[a + k]) end
  scopes[i] = {kind = tonumber(ARGV[a]), lim = lim, key = KEYS[i]}
  a = a + 8
end

local function offset_at(ms)
  local o = offs[1][2]
  for i = 1, #offs do
    if offs[i][1] <= ms then o = offs[i][2] else break end
  end
  return o
end
local function local_to_utc(l)
  local guess = l - offset_at(l)
  local r = l - offset_at(guess)
  if r + offset_at(r) == l then return r end
  return math.max(guess, r)
end
local function civil_from_days(days)
  local z = days + 719468
  local era = idiv(z, 146097)
  local doe = z - era * 146097
  local yoe = idiv(doe - idiv(doe, 1460) + idiv(doe, 36524) - idiv(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + idiv(yoe, 4) - idiv(yoe, 100))
  local mp = idiv(5 * doy + 2, 153)
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  return y, m
end
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = idiv(y, 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = idiv(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + idiv(yoe, 4) - idiv(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

local day = idiv(now + offset_at(now), DAY)
local y, m = civil_from_days(day)
local month = y * 12 + (m - 1)
local ny, nm = y, m + 1
if m == 12 then ny, nm = y + 1, 1 end
local day_reset = local_to_utc((day + 1) * DAY)
local month_reset = local_to_utc(days_from_civil(ny, nm, 1) * DAY)

-- GCRA bucket (see bucket.rs)
local function ceil_div(x, b) return idiv(x + b - 1, b) end
local function level_at(level, last, limit)
  local e = now - last
  if e < 0 then e = 0 end
  if level < 0 then level = 0 end
  if e >= ceil_div(level, limit) then return 0 end
  return level - e * limit
end
-- How long the bucket state must live: until it has drained, and at least two periods.
local function ttl(level, limit)
  return math.max(P * 2, ceil_div(level, limit) + P)
end
local function wait_ms(level, last, limit, c)
  if c > limit then return -1 end
  local need = level_at(level, last, limit) + c * P - P * limit
  if need <= 0 then return 0 end
  return ceil_div(need, limit)
end

local function state(sc, d, mo)
  local h = redis.call('HMGET', sc.key, 'rl', 'rt', 'tl', 'tt')
  local st = {rl = tonumber(h[1]) or 0, rt = tonumber(h[2]) or 0, tl = tonumber(h[3]) or 0, tt = tonumber(h[4]) or 0}
  local dh = redis.call('HMGET', sc.key .. ':d:' .. S(d), 'r', 't', 's')
  st.dr = tonumber(dh[1]) or 0
  st.dt = tonumber(dh[2]) or 0
  st.ds = tonumber(dh[3]) or 0
  st.ms = tonumber(redis.call('HGET', sc.key .. ':m:' .. S(mo), 's')) or 0
  redis.call('ZREMRANGEBYSCORE', sc.key .. ':cc', '-inf', S(now))
  st.cc = redis.call('ZCARD', sc.key .. ':cc')
  return st
end

if mode == 'settle' then
  for i = 1, #scopes do
    local sc = scopes[i]
    redis.call('ZREM', sc.key .. ':cc', rid)
    local tpm = sc.lim[2]
    if tpm >= 0 and d_tokens ~= 0 then
      local h = redis.call('HMGET', sc.key, 'tl', 'tt')
      local last = tonumber(h[2]) or 0
      local l = level_at(tonumber(h[1]) or 0, last, tpm) + d_tokens * P
      if l < 0 then l = 0 end
      redis.call('HSET', sc.key, 'tl', S(l), 'tt', S(math.max(now, last)))
      if redis.call('PTTL', sc.key) < ttl(l, tpm) then redis.call('PEXPIRE', sc.key, S(ttl(l, tpm))) end
    end
    local dk = sc.key .. ':d:' .. S(s_day)
    if redis.call('EXISTS', dk) == 1 then
      if redis.call('HINCRBY', dk, 't', S(d_tokens)) < 0 then redis.call('HSET', dk, 't', 0) end
      if redis.call('HINCRBY', dk, 's', S(d_cost)) < 0 then redis.call('HSET', dk, 's', 0) end
    end
    local mk = sc.key .. ':m:' .. S(s_month)
    if redis.call('EXISTS', mk) == 1 then
      if redis.call('HINCRBY', mk, 's', S(d_cost)) < 0 then redis.call('HSET', mk, 's', 0) end
    end
  end
  return {1}
end

local sts = {}
for i = 1, #scopes do sts[i] = state(scopes[i], day, month) end

local fail = nil -- {scope kind, limit index, max, wait (-1 = never)}
local function consider(sc, k, max, w)
  if fail == nil then fail = {sc.kind, k, max, w} return end
  if fail[4] == -1 then return end
  if w == -1 or w > fail[4] then fail = {sc.kind, k, max, w} end
end

if mode == 'admit' then
  for i = 1, #scopes do
    local sc, st, L = scopes[i], sts[i], scopes[i].lim
    if L[1] >= 0 then
      local w = wait_ms(st.rl, st.rt, L[1], 1)
      if w ~= 0 then consider(sc, 0, L[1], w) end
    end
    if L[2] >= 0 then
      local w = wait_ms(st.tl, st.tt, L[2], tokens)
      if w ~= 0 then consider(sc, 1, L[2], w) end
    end
    if L[3] >= 0 and st.cc >= L[3] then consider(sc, 2, L[3], 1000) end
    if L[4] >= 0 and st.dr + 1 > L[4] then consider(sc, 3, L[4], day_reset - now) end
    if L[5] >= 0 then
      if tokens > L[5] then consider(sc, 4, L[5], -1)
      elseif st.dt + tokens > L[5] then consider(sc, 4, L[5], day_reset - now) end
    end
    if L[6] >= 0 then
      if cost > L[6] then consider(sc, 5, L[6], -1)
      elseif st.ds + cost > L[6] then consider(sc, 5, L[6], day_reset - now) end
    end
    if L[7] >= 0 then
      if cost > L[7] then consider(sc, 6, L[7], -1)
      elseif st.ms + cost > L[7] then consider(sc, 6, L[7], month_reset - now) end
    end
  end
  if fail == nil then
    for i = 1, #scopes do
      local sc, st, L = scopes[i], sts[i], scopes[i].lim
      if L[1] >= 0 then
        st.rl = level_at(st.rl, st.rt, L[1]) + P
        st.rt = math.max(now, st.rt)
      end
      if L[2] >= 0 then
        st.tl = level_at(st.tl, st.tt, L[2]) + tokens * P
        st.tt = math.max(now, st.tt)
      end
      if L[1] >= 0 or L[2] >= 0 then
        redis.call('HSET', sc.key, 'rl', S(st.rl), 'rt', S(st.rt), 'tl', S(st.tl), 'tt', S(st.tt))
        local keep = P * 2
        if L[2] >= 0 then keep = ttl(st.tl, L[2]) end
        redis.call('PEXPIRE', sc.key, S(keep))
      end
      if L[3] >= 0 then
        redis.call('ZADD', sc.key .. ':cc', S(now + lease), rid)
        redis.call('PEXPIRE', sc.key .. ':cc', S(lease + P))
        st.cc = st.cc + 1
      end
      local dk = sc.key .. ':d:' .. S(day)
      st.dr = redis.call('HINCRBY', dk, 'r', 1)
      st.dt = redis.call('HINCRBY', dk, 't', S(tokens))
      st.ds = redis.call('HINCRBY', dk, 's', S(cost))
      redis.call('PEXPIREAT', dk, S(day_reset + P))
      local mk = sc.key .. ':m:' .. S(month)
      st.ms = redis.call('HINCRBY', mk, 's', S(cost))
      redis.call('PEXPIREAT', mk, S(month_reset + P))
    end
  end
end

-- Result: ok, fail scope, fail limit, fail max, fail wait, day, month, then per limit:
-- scope kind, limit index, max, remaining, reset ms.
local out = {}
if fail == nil then out = {1, -1, -1, -1, -1, day, month}
else out = {0, fail[1], fail[2], fail[3], fail[4], day, month} end
for i = 1, #scopes do
  local sc, st, L = scopes[i], sts[i], scopes[i].lim
  for k = 1, 7 do
    local max = L[k]
    if max >= 0 then
      local rem, reset = 0, 0
      if k == 1 or k == 2 then
        local lv, last = st.rl, st.rt
        if k == 2 then lv, last = st.tl, st.tt end
        local l = level_at(lv, last, max)
        rem = idiv(math.max(P * max - l, 0), P)
        reset = ceil_div(l, max)
      elseif k == 3 then
        rem = math.max(max - st.cc, 0)
      else
        local used = st.dr
        if k == 5 then used = st.dt elseif k == 6 then used = st.ds elseif k == 7 then used = st.ms end
        rem = math.max(max - used, 0)
        if used > 0 then
          if k == 7 then reset = month_reset - now else reset = day_reset - now end
        end
      end
      table.insert(out, sc.kind)
      table.insert(out, k - 1)
      table.insert(out, max)
      table.insert(out, rem)
      table.insert(out, reset)
    end
  end
end
return out
