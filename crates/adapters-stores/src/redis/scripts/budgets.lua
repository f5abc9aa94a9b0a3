-- budgets: every budget's definition and, when `now` is given, its status rolled to
-- `now`. The ledgers share the hash tag of KEYS[1], so the script may name them itself.
--
-- KEYS[1] the set of budget ids.
-- ARGV: 1 ledger key prefix, 2 now ('' = do not roll), 3-8 day/week/month period bounds.
--
-- Returns one row per budget: {id, definition, spent, reserved, period end}.

local now = tonumber(ARGV[2])
local bounds = {}
for i = 1, 6 do
  bounds[i] = tonumber(ARGV[2 + i])
end

local rows = {}
for _, id in ipairs(call('SMEMBERS', KEYS[1])) do
  local l = load_ledger(ARGV[1] .. id)
  if l then
    if now then
      roll_ledger(l, now, bounds)
    end
    rows[#rows + 1] = status_row(id, l)
  end
end
return rows
