-- observe_quota: replaces what the provider last said about a key's capacity.
--
-- KEYS: 1 key hash, 2 observation hash.
-- ARGV: 1 now, 2.. field/value pairs (lr, rr, rrat, lt, rt, rtat; absent = unknown).
--
-- Returns 1, or 0 when there is no such key.

if call('EXISTS', KEYS[1]) == 0 then
  return 0
end
call('DEL', KEYS[2])
local fields = {}
for i = 2, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
call('HSET', KEYS[2], 'at', ARGV[1], unpack(fields))
return 1
