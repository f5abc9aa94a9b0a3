-- update_metadata: replaces a key's metadata.
--
-- KEYS: 1 key hash. ARGV: 1 metadata JSON, 2 event channel, 3 key id.
--
-- Returns the key hash after the change, or nil when there is no such key.

if call('EXISTS', KEYS[1]) == 0 then
  return false
end
call('HSET', KEYS[1], 'meta', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return call('HGETALL', KEYS[1])
