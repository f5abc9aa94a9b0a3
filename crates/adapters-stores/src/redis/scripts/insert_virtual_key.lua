-- insert_virtual_key: adds a virtual key's record unless its name is taken.
--
-- KEYS: 1 the virtual keys' hash (name to JSON record).
-- ARGV: 1 name, 2 the record, 3 virtual-key event channel (payload: the name).
--
-- Returns 1, or 0 when the name is taken.

if call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
