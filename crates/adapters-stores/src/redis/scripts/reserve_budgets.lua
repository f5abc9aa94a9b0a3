-- reserve_budgets: the budgets' part of a charge on Redis Cluster (the first of the
-- split reserve; see reserve.lua for the single-server script). Checks every hard
-- budget and, only if all fit, reserves the estimate in each. Touches only names
-- under the budgets' hash tag.
--
-- KEYS: per budget (ascending id, no duplicates) its ledger hash and its
-- reservations hash.
-- ARGV: 1 now, 2 estimated cost (nano-dollars), 3 reservation id, 4-9 day/week/month
-- period bounds, 10.. budget ids.
--
-- Returns {'ok'} or {'budget', id, limit, spent, reserved, requested}.

local now = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local reservation = ARGV[3]
local bounds = {}
for i = 1, 6 do
  bounds[i] = tonumber(ARGV[3 + i])
end

-- Check the budgets (BudgetLedger::check after roll). Unknown ids are ignored.
local ledgers = {}
for i = 1, #KEYS / 2 do
  local l = load_ledger(KEYS[2 * i - 1])
  if l then
    roll_ledger(l, now, bounds)
    if l.hard and l.spent + l.reserved + cost > l.limit then
      return { 'budget', ARGV[9 + i], fmt(l.limit), fmt(l.spent), fmt(l.reserved), ARGV[2] }
    end
    l.reservations = KEYS[2 * i]
    ledgers[#ledgers + 1] = l
  end
end

for _, l in ipairs(ledgers) do
  -- Reserving an id again replaces the first reservation.
  take_reservation(l, l.reservations, reservation)
  put_reservation(l, l.reservations, reservation, ARGV[2], ARGV[1])
end
return { 'ok' }
