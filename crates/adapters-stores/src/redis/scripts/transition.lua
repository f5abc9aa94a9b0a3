-- transition: moves a key to a new state and records the transition, provided the key
-- is still in the state the caller validated the move from (compare and set; the
-- state machine itself is checked by the domain before the call).
--
-- KEYS: 1 key hash, 2 transitions list.
-- ARGV: 1 expected current state, 2 new state, 3 reason, 4 cooldown-until ('' = none),
-- 5 transition JSON, 6 event channel, 7 key id.
--
-- Returns {'ok'}, {'missing'} or {'moved', current state}.

local state = call('HGET', KEYS[1], 'state')
if not state then
  return { 'missing' }
end
if state ~= ARGV[1] then
  return { 'moved', state }
end
call('HSET', KEYS[1], 'state', ARGV[2], 'reason', ARGV[3], 'cooldown', ARGV[4])
call('RPUSH', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[6], ARGV[7])
return { 'ok' }
