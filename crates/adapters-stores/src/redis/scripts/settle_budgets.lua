-- settle_budgets: the budgets' part of settling a charge (BudgetLedger::commit):
-- replaces each reservation with the actual cost and returns the status of every
-- budget charged. Touches only names under the budgets' hash tag.
--
-- KEYS: per budget (ascending id, no duplicates) its ledger hash and its
-- reservations hash.
-- ARGV: 1 now, 2 actual cost, 3 reservation id, 4-9 day/week/month period bounds,
-- 10.. budget ids.
--
-- Reservation id 0 (ReservationId::NONE) is spend without a reservation
-- (BudgetLedger::add_unreserved): spend dated before the current period is not
-- carried into it.
--
-- Returns one row per existing budget: {id, definition, spent, reserved, period end}.

local now = tonumber(ARGV[1])
local actual_cost = tonumber(ARGV[2])
local unreserved = ARGV[3] == '0'
local bounds = {}
for i = 1, 6 do
  bounds[i] = tonumber(ARGV[3 + i])
end

local rows = {}
local n_budgets = #KEYS / 2
for i = 1, n_budgets do
  local l = load_ledger(KEYS[2 * i - 1])
  if l then
    roll_ledger(l, now, bounds)
    take_reservation(l, KEYS[2 * i], ARGV[3])
    if not (unreserved and now < l.start) then
      -- Money spent is never forgotten: an unknown reservation still charges the cost.
      l.spent = l.spent + actual_cost
      call('HSET', l.key, 'spent', fmt(l.spent))
    end
    rows[#rows + 1] = status_row(ARGV[9 + i], l)
  end
end
return rows
