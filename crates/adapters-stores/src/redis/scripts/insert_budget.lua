-- insert_budget: adds a budget unless its id is taken.
--
-- KEYS: 1 set of budget ids, 2 the budget's ledger, 3 its reservations (both cleared
-- first: a budget deleted under the same id may have left them). The three share the
-- budgets' hash tag.
-- ARGV: 1 budget id, 2 event channel, 3.. field/value pairs of the ledger hash.
--
-- Returns 1, or 0 when the id is taken.

if call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then
  return 0
end
call('DEL', KEYS[2], KEYS[3])
call('HSET', KEYS[2], unpack(ARGV, 3))
call('SADD', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[1])
return 1
