-- record_outcome: adds one call's outcome to a key's counters (KeyStats::record plus
-- tokens, cost and throttle streak, with the same arithmetic in the same order, so
-- the moving averages match the domain's to the last bit).
--
-- KEYS: 1 key hash.
-- ARGV: 1 success (0/1), 2 rate limited (0/1), 3 latency in ms (float), 4 prompt
-- tokens, 5 completion tokens, 6 cost (nano-dollars), 7 now.
--
-- Returns the key hash after the change, or nil when there is no such key.

local EWMA_ALPHA = 0.2
local doc = KEYS[1]
if call('EXISTS', doc) == 0 then
  return false
end
local success = ARGV[1] == '1'

call('HINCRBY', doc, 'requests', 1)
call('HSET', doc, 'last_used', ARGV[7])
local ewma = num(doc, 'success_ewma', call('HGET', doc, 'success_ewma') or '1')
local sample = 0.0
if success then
  sample = 1.0
end
ewma = ewma + EWMA_ALPHA * (sample - ewma)
call('HSET', doc, 'success_ewma', string.format('%.17g', ewma))
if success then
  local successes = call('HINCRBY', doc, 'successes', 1)
  call('HSET', doc, 'consecutive_failures', '0', 'throttle_streak', '0')
  local ms = tonumber(ARGV[3])
  local latency = ms
  if successes ~= 1 then
    local previous = num(doc, 'latency_ewma_ms', call('HGET', doc, 'latency_ewma_ms') or '0')
    latency = previous + EWMA_ALPHA * (ms - previous)
  end
  call('HSET', doc, 'latency_ewma_ms', string.format('%.17g', latency))
else
  call('HINCRBY', doc, 'failures', 1)
  call('HINCRBY', doc, 'consecutive_failures', 1)
end
call('HINCRBY', doc, 'prompt_tokens', ARGV[4])
call('HINCRBY', doc, 'completion_tokens', ARGV[5])
call('HINCRBY', doc, 'cost', ARGV[6])
if ARGV[2] == '1' then
  call('HINCRBY', doc, 'throttle_streak', 1)
end
return call('HGETALL', doc)
