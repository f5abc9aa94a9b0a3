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

local doc, obs_key = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local prefix = ARGV[2]
local tokens = tonumber(ARGV[3])

local generation = call('HGET', doc, 'g')
if not generation then
  return { 'missing' }
end

local windows, obs, refused = check_key(prefix, generation, obs_key, now, ARGV[3], 3, 8, 13)
if refused then
  return refused
end
charge_key(windows, obs_key, obs, tokens)
return { 'ok' }
