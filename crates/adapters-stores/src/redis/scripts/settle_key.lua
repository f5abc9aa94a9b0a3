-- settle_key: the key's part of settling or releasing a charge, in one script:
-- replaces the estimated tokens with the actual ones in the token windows
-- (QuotaWindows::reconcile_tokens), stores the provider's observation if one came,
-- and adds the call's outcome to the key's counters (KeyStats::record plus tokens,
-- cost and throttle streak, with the same arithmetic in the same order, so the
-- moving averages match the domain's to the last bit).
--
-- Touches only names under the key's hash tag; the budgets' part is a separate
-- script in the same pipeline (see the module docs, "Redis Cluster").
--
-- KEYS: 1 key hash, 2 observation hash.
-- ARGV: 1 window key prefix, 2 estimated tokens, 3 actual tokens, 4-6 starts of the
-- token windows (tpm, tpd, monthly) the estimate was counted in, 7 the verdict
-- (1 succeeded, 0 failed, - abandoned: the request, success, failure and latency
-- counters are left alone),
-- 8 rate limited (0/1), 9 latency in ms (float), 10 prompt tokens, 11 completion
-- tokens, 12 cost (nano-dollars), 13 now, 14 whether an observation came (0/1),
-- 15.. its field/value pairs (lr, rr, rrat, lt, rt, rtat; absent = unknown).
--
-- Returns the key hash after the change, or nil when there is no such key (deleted
-- since the reserve: nothing of it is left to update).

local EWMA_ALPHA = 0.2
local doc, obs_key = KEYS[1], KEYS[2]
if call('EXISTS', doc) == 0 then
  return false
end

reconcile_tokens(doc, ARGV[1], { ARGV[4], ARGV[5], ARGV[6] }, tonumber(ARGV[2]), tonumber(ARGV[3]))

if ARGV[14] == '1' then
  call('DEL', obs_key)
  local fields = {}
  for i = 15, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  call('HSET', obs_key, 'at', ARGV[13], unpack(fields))
end

if ARGV[7] ~= '-' then
  local success = ARGV[7] == '1'
  call('HINCRBY', doc, 'requests', 1)
  call('HSET', doc, 'last_used', ARGV[13])
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
    local ms = tonumber(ARGV[9])
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
end
call('HINCRBY', doc, 'prompt_tokens', ARGV[10])
call('HINCRBY', doc, 'completion_tokens', ARGV[11])
call('HINCRBY', doc, 'cost', ARGV[12])
if ARGV[8] == '1' then
  call('HINCRBY', doc, 'throttle_streak', 1)
end
return call('HGETALL', doc)
