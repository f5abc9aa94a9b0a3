-- reserve_key: the key's part of a charge on Redis Cluster (the last of the split
-- reserve): checks every quota window of the key and the provider's observation
-- and, only if all fit, counts the request and the estimated tokens. Touches only
-- names under the key's hash tag (the window counters share it).
--
-- KEYS[1] key hash, KEYS[2] the key's provider observation hash.
-- ARGV: 1 now, 2 window key prefix, 3 estimated tokens, 4-8 limits (rpm, tpm, rpd,
-- tpd, monthly tokens; '' = none), 9-13 window starts, 14-18 window ends.
--
-- Returns {'ok'}, {'missing'} (no such key) or {'quota', kind, retry_at}.

local KINDS = { 'rpm', 'tpm', 'rpd', 'tpd', 'mtok' }
local COUNTS_TOKENS = { false, true, false, true, true }

local doc, obs_key = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local prefix = ARGV[2]
local tokens = tonumber(ARGV[3])

local generation = call('HGET', doc, 'g')
if not generation then
  return { 'missing' }
end

-- Check the windows (QuotaWindows::check), in the domain's order.
local windows = {}
for i = 1, 5 do
  local wkey = window_key(prefix, generation, KINDS[i], ARGV[8 + i])
  local add = COUNTS_TOKENS[i] and ARGV[3] or '1'
  windows[i] = { key = wkey, add = add, start = tonumber(ARGV[8 + i]), ['end'] = tonumber(ARGV[13 + i]) }
  local limit = ARGV[3 + i]
  if limit ~= '' then
    local used = num(wkey, 'u', call('HGET', wkey, 'u') or '0')
    if used + tonumber(add) > tonumber(limit) then
      return { 'quota', KINDS[i], ARGV[13 + i] }
    end
  end
end

-- What the provider said, as in reserve.lua.
local obs = hgetall(obs_key)
if next(obs) ~= nil then
  if obs.rrat and num(obs_key, 'rrat', obs.rrat) <= now then
    obs.rr, obs.rrat = obs.lr, nil
    call('HDEL', obs_key, 'rrat', 'rr')
    if obs.rr then
      call('HSET', obs_key, 'rr', obs.rr)
    end
  end
  if obs.rtat and num(obs_key, 'rtat', obs.rtat) <= now then
    obs.rt, obs.rtat = obs.lt, nil
    call('HDEL', obs_key, 'rtat', 'rt')
    if obs.rt then
      call('HSET', obs_key, 'rt', obs.rt)
    end
  end
  if obs.rr and num(obs_key, 'rr', obs.rr) == 0 and obs.rrat then
    return { 'quota', 'rpm', obs.rrat }
  end
  if tokens > 0 and obs.rt and num(obs_key, 'rt', obs.rt) == 0 and obs.rtat then
    return { 'quota', 'tpm', obs.rtat }
  end
end

-- Everything fits: charge it.
for i = 1, 5 do
  local w = windows[i]
  call('HINCRBY', w.key, 'u', w.add)
  if call('HINCRBY', w.key, 's', 1) == 1 then
    call('PEXPIREAT', w.key, fmt(w['end'] + (w['end'] - w.start) + 1000))
  end
end
if next(obs) ~= nil then
  if obs.rr then
    call('HSET', obs_key, 'rr', fmt(math.max(num(obs_key, 'rr', obs.rr) - 1, 0)))
  end
  if obs.rt then
    call('HSET', obs_key, 'rt', fmt(math.max(num(obs_key, 'rt', obs.rt) - tokens, 0)))
  end
end
return { 'ok' }
