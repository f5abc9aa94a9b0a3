-- rotate_virtual_key: replaces the token digest in a virtual key's JSON record,
-- leaving the rest as stored.
--
-- KEYS: 1 the virtual keys' hash (name to JSON record).
-- ARGV: 1 name, 2 the new digest (hex digits), 3 virtual-key event channel (payload: the name).
--
-- Returns {1, the record before}, or {0, ''} when there is none, {-1, ''} when it is
-- revoked, {-2, ''} when the text holds no digest. A top-level `"token_sha256":"`
-- cannot occur inside a string value, where quotes are escaped.

local json = call('HGET', KEYS[1], ARGV[1])
if not json then
  return { 0, '' }
end
if string.find(json, '"revoked_at":', 1, true) then
  return { -1, '' }
end
local rotated, n = string.gsub(json, '"token_sha256":"%x+"', '"token_sha256":"' .. ARGV[2] .. '"', 1)
if n ~= 1 then
  return { -2, '' }
end
call('HSET', KEYS[1], ARGV[1], rotated)
redis.call('PUBLISH', ARGV[3], ARGV[1])
return { 1, json }
