-- release_budgets: the budgets' part of releasing a charge (BudgetLedger::release):
-- gives back each reservation. Touches only names under the budgets' hash tag.
--
-- KEYS: per budget (ascending id, no duplicates) its ledger hash and its
-- reservations hash.
-- ARGV: 1 reservation id.

local n_budgets = #KEYS / 2
for i = 1, n_budgets do
  local l = load_ledger(KEYS[2 * i - 1])
  if l then
    take_reservation(l, KEYS[2 * i], ARGV[1])
  end
end
return 1
