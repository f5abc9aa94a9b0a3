-- reclaim: gives back, in every budget, the reservations taken before a cutoff
-- (BudgetLedger::reclaim): left by an instance that died between reserve and settle.
-- A reservation stored without its time (before times were kept, perhaps by an
-- instance still running) is dated now instead, so it goes one lease later.
-- The ledgers and reservations share the hash tag of KEYS[1], so the script may name
-- them itself.
--
-- KEYS[1] the set of budget ids.
-- ARGV: 1 ledger key prefix, 2 reservations key prefix, 3 cutoff (ms), 4 now (ms).
--
-- Returns one row per budget that gave any back: {id, count, amount}.

local cutoff = tonumber(ARGV[3])

local rows = {}
for _, id in ipairs(call('SMEMBERS', KEYS[1])) do
  local l = load_ledger(ARGV[1] .. id)
  if l then
    local key = ARGV[2] .. id
    local held = call('HGETALL', key)
    -- Every value is parsed before anything is written: a malformed one stops the
    -- script with this budget unchanged.
    local stale, undated, amount = {}, {}, 0
    for i = 1, #held, 2 do
      local value = held[i + 1]
      local value_amount = held_amount(key, held[i], value)
      local since = held_since(value)
      if since == nil then
        undated[#undated + 1] = { held[i], string.match(value, '^[^:]*') }
      elseif since < cutoff then
        stale[#stale + 1] = held[i]
        amount = amount + value_amount
      end
    end
    for _, entry in ipairs(undated) do
      call('HSET', key, entry[1], entry[2] .. ':' .. ARGV[4])
    end
    if #stale > 0 then
      for _, field in ipairs(stale) do
        call('HDEL', key, field)
      end
      l.reserved = math.max(l.reserved - amount, 0)
      call('HSET', l.key, 'reserved', fmt(l.reserved))
      rows[#rows + 1] = { id, tostring(#stale), fmt(amount) }
    end
  end
end
return rows
