-- release: gives back the estimate of an attempt that cost nothing
-- (BudgetLedger::release). The request stays counted in the request windows; the
-- estimated tokens are taken out of the token windows.
--
-- KEYS[1] key hash, then per budget (ascending id, no duplicates) its ledger hash and
-- its reservations hash.
-- ARGV: 1 window key prefix, 2 estimated tokens, 3-5 starts of the token windows
-- (tpm, tpd, monthly) the estimate was counted in, 6 reservation id.

reconcile_tokens(KEYS[1], ARGV[1], { ARGV[3], ARGV[4], ARGV[5] }, tonumber(ARGV[2]), 0)

local n_budgets = (#KEYS - 1) / 2
for i = 1, n_budgets do
  local l = load_ledger(KEYS[2 * i])
  if l then
    take_reservation(l, KEYS[2 * i + 1], ARGV[6])
  end
end
return 1
