-- redefine_budget: changes a budget's definition in place (BudgetLedger::redefine),
-- keeping what it spent this period and the reservations it holds.
--
-- KEYS[1] the budget's ledger.
-- ARGV: 1 now, 2-7 day/week/month period bounds, 8 the budget id, 9 event channel,
-- then pairs of field and value: def, limit, hard, period, anchor, len, start, end
-- (the new definition, its period's bounds at `now`).
--
-- Returns the budget's status row {id, definition, spent, reserved, period end}, or
-- nil when there is no such budget.

local l = load_ledger(KEYS[1])
if not l then
  return nil
end
local now = tonumber(ARGV[1])
local bounds = {}
for i = 1, 6 do
  bounds[i] = tonumber(ARGV[1 + i])
end
roll_ledger(l, now, bounds)

local new = {}
for i = 10, #ARGV, 2 do
  new[ARGV[i]] = ARGV[i + 1]
end
local fields = { 'def', new.def, 'limit', new.limit, 'hard', new.hard, 'period', new.period,
  'anchor', new.anchor, 'len', new.len }
-- Only a new period kind moves the period; the spend is carried into it.
if new.period ~= l.period or tonumber(new.anchor) ~= l.anchor or tonumber(new.len) ~= l.len then
  l.start, l['end'] = tonumber(new.start), tonumber(new['end'])
  fields[#fields + 1] = 'start'
  fields[#fields + 1] = new.start
  fields[#fields + 1] = 'end'
  fields[#fields + 1] = new['end']
end
call('HSET', KEYS[1], unpack(fields))
redis.call('PUBLISH', ARGV[9], ARGV[8])
l.def = new.def
return status_row(ARGV[8], l)
