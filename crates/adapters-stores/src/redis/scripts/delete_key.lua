-- delete_key: removes a key with its transitions and provider observation. Its window
-- counters belong to its generation and expire on their own.
--
-- KEYS: 1 key hash, 2 transitions list, 3 observation hash, 4 set of key ids (left
-- out on Redis Cluster, where the adapter removes the id itself, after this script).
-- ARGV: 1 key id, 2 event channel.
--
-- Returns 1, or 0 when there is no such key.

if call('EXISTS', KEYS[1]) == 0 then
  return 0
end
call('DEL', KEYS[1])
call('DEL', KEYS[2])
call('DEL', KEYS[3])
if KEYS[4] then
  call('SREM', KEYS[4], ARGV[1])
end
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
