-- insert_key: registers a key unless its id is taken.
--
-- KEYS: 1 key hash, 2 transitions list, 3 observation hash, 4 generation counter,
-- 5 set of key ids (left out on Redis Cluster, where the adapter adds the id to
-- the set itself, before this script: the set has a hash tag of its own).
-- ARGV: 1 key id, 2 event channel, 3.. field/value pairs of the key hash.
--
-- Returns 1, or 0 when the id is taken.

local existing = call('TYPE', KEYS[1])['ok']
if existing == 'hash' then
  return 0
elseif existing ~= 'none' then
  error({ err = 'BADDATA ' .. KEYS[1] .. ' a ' .. tostring(existing) .. ' where a key hash belongs' })
end
local generation = call('INCR', KEYS[4])
call('DEL', KEYS[2])
call('DEL', KEYS[3])
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
call('HSET', KEYS[1], 'g', fmt(generation), unpack(fields))
if KEYS[5] then
  call('SADD', KEYS[5], ARGV[1])
end
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
