-- settle: replaces a charge's estimate with the actual tokens and cost
-- (QuotaWindows::reconcile_tokens, BudgetLedger::commit) and returns the status of
-- every budget charged.
--
-- KEYS[1] key hash, then per budget (ascending id, no duplicates) its ledger hash and
-- its reservations hash.
-- ARGV: 1 now, 2 window key prefix, 3 estimated tokens, 4 actual tokens, 5-7 starts of
-- the token windows (tpm, tpd, monthly) the estimate was counted in, 8 actual cost,
-- 9 reservation id, 10-15 day/week/month period bounds, 16.. budget ids.
--
-- Returns one row per existing budget: {id, definition, spent, reserved, period end}.

local now = tonumber(ARGV[1])
local actual_cost = tonumber(ARGV[8])
local bounds = {}
for i = 1, 6 do
  bounds[i] = tonumber(ARGV[9 + i])
end

-- A key deleted since the reservation has no windows left to adjust.
reconcile_tokens(KEYS[1], ARGV[2], { ARGV[5], ARGV[6], ARGV[7] }, tonumber(ARGV[3]), tonumber(ARGV[4]))

local rows = {}
local n_budgets = (#KEYS - 1) / 2
for i = 1, n_budgets do
  local l = load_ledger(KEYS[2 * i])
  if l then
    roll_ledger(l, now, bounds)
    take_reservation(l, KEYS[2 * i + 1], ARGV[9])
    -- Money spent is never forgotten: an unknown reservation still charges the cost.
    l.spent = l.spent + actual_cost
    call('HSET', l.key, 'spent', fmt(l.spent))
    rows[#rows + 1] = status_row(ARGV[15 + i], l)
  end
end
return rows
