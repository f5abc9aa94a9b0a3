-- budgets: every budget's definition (or only ARGV[9]'s) and, when `now` is given,
-- its status rolled to `now`. The ledgers share the hash tag of KEYS[1], so the
-- script may name them itself.
--
-- KEYS[1] the set of budget ids.
-- ARGV: 1 ledger key prefix, 2 now ('' = do not roll), 3-8 day/week/month period
-- bounds, 9 (optional) the one budget id to read.
--
-- Returns one row per budget: {id, definition, spent, reserved, period end}.

local now = tonumber(ARGV[2])
local bounds = {}
for i = 1, 6 do
  bounds[i] = tonumber(ARGV[2 + i])
end

local rows = {}
local ids
if ARGV[9] then
  ids = {}
  if call('SISMEMBER', KEYS[1], ARGV[9]) == 1 then
    ids[1] = ARGV[9]
  end
else
  ids = call('SMEMBERS', KEYS[1])
end
for _, id in ipairs(ids) do
  local l = load_ledger(ARGV[1] .. id)
  if l then
    if now then
      roll_ledger(l, now, bounds)
    end
    rows[#rows + 1] = status_row(id, l)
  end
end
return rows
