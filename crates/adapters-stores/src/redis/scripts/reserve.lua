-- reserve: checks every quota window of a key and every budget of a charge and, only
-- if all fit, counts the request and reserves the estimate in each. One script, so
-- one round trip and atomic: either everything is charged or nothing is.
--
-- KEYS[1] key hash, KEYS[2] the key's provider observation hash, then per budget
-- (ascending id, no duplicates) its ledger hash and its reservations hash, then, with
-- a client limit, the client's counter for this minute.
-- ARGV: 1 now, 2 window key prefix, 3 estimated tokens, 4 estimated cost (nano-dollars),
-- 5 reservation id, 6-10 limits (rpm, tpm, rpd, tpd, monthly tokens; '' = none),
-- 11-15 window starts, 16-20 window ends, 21-26 day/week/month period bounds,
-- 27 client rpm ('' = none), 28 end of the client's minute, 29.. budget ids.
--
-- Returns {'ok'}, {'missing'} (no such key), {'client', retry_at},
-- {'quota', kind, retry_at} or {'budget', id, limit, spent, reserved, requested}.

local doc, obs_key = KEYS[1], KEYS[2]
local now = tonumber(ARGV[1])
local prefix = ARGV[2]
local tokens = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local reservation = ARGV[5]
local bounds = {}
for i = 1, 6 do
  bounds[i] = tonumber(ARGV[20 + i])
end

local generation = call('HGET', doc, 'g')
if not generation then
  return { 'missing' }
end

-- The client's allowance for this minute, shared by every instance.
local client_key = nil
if ARGV[27] ~= '' then
  client_key = KEYS[#KEYS]
  if tonumber(call('GET', client_key) or '0') >= tonumber(ARGV[27]) then
    return { 'client', ARGV[28] }
  end
end

local windows, obs, refused = check_key(prefix, generation, obs_key, now, ARGV[3], 5, 10, 15)
if refused then
  return refused
end

-- Check the budgets (BudgetLedger::check after roll). Unknown ids are ignored.
local ledgers = {}
local n_budgets = (#KEYS - 2 - (client_key and 1 or 0)) / 2
for i = 1, n_budgets do
  local l = load_ledger(KEYS[1 + 2 * i])
  if l then
    roll_ledger(l, now, bounds)
    if l.hard and l.spent + l.reserved + cost > l.limit then
      return { 'budget', ARGV[28 + i], fmt(l.limit), fmt(l.spent), fmt(l.reserved), ARGV[4] }
    end
    l.reservations = KEYS[2 + 2 * i]
    ledgers[#ledgers + 1] = l
  end
end

-- Everything fits: charge it all.
charge_key(windows, obs_key, obs, tokens)
for _, l in ipairs(ledgers) do
  -- Reserving an id again replaces the first reservation.
  take_reservation(l, l.reservations, reservation)
  put_reservation(l, l.reservations, reservation, ARGV[4], ARGV[1])
end
if client_key and call('INCR', client_key) == 1 then
  call('PEXPIREAT', client_key, fmt(tonumber(ARGV[28]) + 60000))
end
return { 'ok' }
