-- update_virtual_key: replaces a virtual key's record if it still reads as the caller
-- read it and is not revoked. A rotation in between changes the text, so the caller
-- reads again rather than write the old digest back.
--
-- KEYS: 1 the virtual keys' hash (name to JSON record).
-- ARGV: 1 name, 2 the new record, 3 the record text it was built from, 4 virtual-key
-- event channel (payload: the name).
--
-- Returns 1, or 0 when there is none, -1 when it is revoked, -2 when it changed since
-- the caller read it.

local json = call('HGET', KEYS[1], ARGV[1])
if not json then
  return 0
end
if string.find(json, '"revoked_at":', 1, true) then
  return -1
end
if json ~= ARGV[3] then
  return -2
end
call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
