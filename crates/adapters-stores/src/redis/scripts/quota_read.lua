-- quota_read: the counters behind a key's quota snapshot.
--
-- KEYS: 1 key hash, 2 observation hash.
-- ARGV: 1 window key prefix, 2-6 starts of the windows containing now (rpm, tpm, rpd,
-- tpd, monthly tokens), 7-11 starts of the windows before them.
--
-- Returns {'missing', {}, {}} or {'ok', counts, observation}: counts holds used, samples and
-- the previous window's used for each kind in order; observation is the flat hash.

local generation = call('HGET', KEYS[1], 'g')
if not generation then
  return { 'missing', {}, {} }
end
local counts = {}
for i = 1, 5 do
  local current = window_key(ARGV[1], generation, KINDS[i], ARGV[1 + i])
  local previous = window_key(ARGV[1], generation, KINDS[i], ARGV[6 + i])
  local c = call('HMGET', current, 'u', 's')
  counts[#counts + 1] = c[1] or '0'
  counts[#counts + 1] = c[2] or '0'
  counts[#counts + 1] = call('HGET', previous, 'u') or '0'
end
return { 'ok', counts, call('HGETALL', KEYS[2]) }
