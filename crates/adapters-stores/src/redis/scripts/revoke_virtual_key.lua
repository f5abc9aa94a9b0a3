-- revoke_virtual_key: marks a virtual key's record revoked unless it is already, so
-- the first revocation's time is the one kept.
--
-- KEYS: 1 the virtual keys' hash (name to JSON record).
-- ARGV: 1 name, 2 revocation time (Unix ms), 3 virtual-key event channel (payload: the name).
--
-- Returns the record (false when there is none). The field is appended to the JSON
-- text rather than the record re-encoded, which would round its numbers; a top-level
-- `"revoked_at":` cannot occur inside a string value, where quotes are escaped.

local json = call('HGET', KEYS[1], ARGV[1])
if not json then
  return false
end
if not string.find(json, '"revoked_at":', 1, true) then
  json = string.sub(json, 1, -2) .. ',"revoked_at":' .. ARGV[2] .. '}'
  call('HSET', KEYS[1], ARGV[1], json)
end
redis.call('PUBLISH', ARGV[3], ARGV[1])
return json
