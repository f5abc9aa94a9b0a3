-- reclaim: gives back, in every budget, the reservations taken before a cutoff
-- (BudgetLedger::reclaim): left by an instance that died between reserve and settle.
-- The ledgers and reservations share the hash tag of KEYS[1], so the script may name
-- them itself.
--
-- KEYS[1] the set of budget ids.
-- ARGV: 1 ledger key prefix, 2 reservations key prefix, 3 cutoff (ms).
--
-- Returns one row per budget that gave any back: {id, count, amount}.

local cutoff = tonumber(ARGV[3])

local rows = {}
for _, id in ipairs(call('SMEMBERS', KEYS[1])) do
  local l = load_ledger(ARGV[1] .. id)
  if l then
    local key = ARGV[2] .. id
    local held = call('HGETALL', key)
    local count, amount = 0, 0
    for i = 1, #held, 2 do
      if held_since(held[i + 1]) < cutoff then
        call('HDEL', key, held[i])
        count = count + 1
        amount = amount + held_amount(key, held[i], held[i + 1])
      end
    end
    if count > 0 then
      l.reserved = math.max(l.reserved - amount, 0)
      call('HSET', l.key, 'reserved', fmt(l.reserved))
      rows[#rows + 1] = { id, tostring(count), fmt(amount) }
    end
  end
end
return rows
