-- Helpers shared by every script of the Redis store; prepended to each script.
--
-- Numbers: Lua numbers are doubles, so counters and money (integer nano-dollars) are
-- exact up to 2^53 (about 9 million dollars per budget period). Integers are written
-- back with fmt(), never tostring(), which would switch to exponent notation.

-- Runs a command on one of our keys. A failure (WRONGTYPE: someone else's value
-- under our name) becomes a BADDATA error naming the key; the adapter reports it as
-- StoreError Invalid.
local function call(cmd, key, ...)
  local res = redis.pcall(cmd, key, ...)
  if type(res) == 'table' and res.err then
    error({ err = 'BADDATA ' .. key .. ' ' .. res.err })
  end
  return res
end

-- A stored number, or a BADDATA error naming the key and field.
local function num(key, field, value)
  local n = tonumber(value)
  if n == nil then
    error({ err = 'BADDATA ' .. key .. ' field ' .. field .. ' is not a number' })
  end
  return n
end

-- An integer as decimal digits.
local function fmt(n)
  return string.format('%.0f', n)
end

-- A hash as a Lua table (empty when the key does not exist).
local function hgetall(key)
  local flat = call('HGETALL', key)
  local t = {}
  for i = 1, #flat, 2 do
    t[flat[i]] = flat[i + 1]
  end
  return t
end

-- The window counter keys of a key: prefix .. generation .. ':' .. kind .. ':' .. start.
-- The generation changes when a key id is deleted and registered again, so a new key
-- never sees the windows of its predecessor (they expire on their own).
local function window_key(prefix, generation, kind, start)
  return prefix .. generation .. ':' .. kind .. ':' .. start
end

-- A budget ledger (hash fields: def, limit, hard, period, anchor, len, start, end,
-- spent, reserved) with its numbers parsed, or nil when the budget does not exist.
local function load_ledger(key)
  local h = hgetall(key)
  if h.limit == nil then
    if next(h) ~= nil then
      error({ err = 'BADDATA ' .. key .. ' budget ledger has no limit' })
    end
    return nil
  end
  return {
    key = key,
    def = h.def or '',
    limit = num(key, 'limit', h.limit),
    hard = h.hard == '1',
    period = h.period,
    anchor = num(key, 'anchor', h.anchor or '0'),
    len = num(key, 'len', h.len or '1000'),
    start = num(key, 'start', h.start),
    ['end'] = num(key, 'end', h['end']),
    spent = num(key, 'spent', h.spent),
    reserved = num(key, 'reserved', h.reserved),
  }
end

-- Starts a new period when `now` is past the current one (BudgetLedger::roll):
-- spent goes back to zero, reservations stay held. `bounds` holds the day, week and
-- month periods containing `now`, computed by the domain (BudgetPeriod::bounds);
-- custom periods are computed here the same way.
local function roll_ledger(l, now, bounds)
  if now < l['end'] then
    return
  end
  local s, e
  if l.period == 'daily' then
    s, e = bounds[1], bounds[2]
  elseif l.period == 'weekly' then
    s, e = bounds[3], bounds[4]
  elseif l.period == 'monthly' then
    s, e = bounds[5], bounds[6]
  elseif l.period == 'custom' then
    local elapsed = math.max(now - l.anchor, 0)
    s = l.anchor + elapsed - (elapsed % l.len)
    e = s + l.len
  else
    error({ err = 'BADDATA ' .. l.key .. ' unknown budget period ' .. tostring(l.period) })
  end
  l.start, l['end'], l.spent = s, e, 0
  call('HSET', l.key, 'start', fmt(s), 'end', fmt(e), 'spent', '0')
end

-- A reservation's value is its amount, a colon and when it was taken (ms). Values
-- written before the time was kept are a bare amount: `held_since` gives nil.
local function held_amount(key, id, value)
  return num(key, id, string.match(value, '^[^:]*'))
end

local function held_since(value)
  return tonumber(string.match(value, ':(%d+)$'))
end

-- Holds `amount` (digits) for reservation `id` in a ledger, taken at `now` (digits).
local function put_reservation(l, reservations_key, id, amount, now)
  call('HSET', reservations_key, id, amount .. ':' .. now)
  l.reserved = l.reserved + tonumber(amount)
  call('HSET', l.key, 'reserved', fmt(l.reserved))
end

-- Drops reservation `id` from a ledger, returning the amount it held (0 if none).
local function take_reservation(l, reservations_key, id)
  local held = call('HGET', reservations_key, id)
  if not held then
    return 0
  end
  call('HDEL', reservations_key, id)
  local amount = held_amount(reservations_key, id, held)
  l.reserved = math.max(l.reserved - amount, 0)
  call('HSET', l.key, 'reserved', fmt(l.reserved))
  return amount
end

-- One row of a budget's status: id, definition, spent, reserved, period end.
local function status_row(id, l)
  return { id, l.def, fmt(l.spent), fmt(l.reserved), fmt(l['end']) }
end

-- Replaces an estimated token count with the actual one in the token windows the
-- estimate was counted in (QuotaWindows::reconcile_tokens). Windows that have
-- expired meanwhile are left alone.
local function reconcile_tokens(doc, prefix, starts, estimated, actual)
  local generation = call('HGET', doc, 'g')
  if not generation then
    return
  end
  local kinds = { 'tpm', 'tpd', 'mtok' }
  for i = 1, 3 do
    local wkey = window_key(prefix, generation, kinds[i], starts[i])
    local used = call('HGET', wkey, 'u')
    if used then
      local new = math.max(num(wkey, 'u', used) - estimated, 0) + actual
      call('HSET', wkey, 'u', fmt(new))
    end
  end
end

local KINDS = { 'rpm', 'tpm', 'rpd', 'tpd', 'mtok' }
local COUNTS_TOKENS = { false, true, false, true, true }

-- Checks a key's five quota windows (QuotaWindows::check, in the domain's order)
-- and the provider's observation, which overrides our view until its reset time.
-- ARGV[limit0 + i], ARGV[start0 + i], ARGV[end0 + i] are window i's limit ('' =
-- none), start and end; `tokens_text` is the estimated tokens as given. Rolling the
-- observation to `now` is not a change (every reader rolls), so it is written back
-- even when the charge is refused. Returns the windows and the observation, or
-- nil, nil and the refusal {'quota', kind, retry_at}.
local function check_key(prefix, generation, obs_key, now, tokens_text, limit0, start0, end0)
  local tokens = tonumber(tokens_text)
  local windows = {}
  for i = 1, 5 do
    local wkey = window_key(prefix, generation, KINDS[i], ARGV[start0 + i])
    local add = COUNTS_TOKENS[i] and tokens_text or '1'
    windows[i] = { key = wkey, add = add, start = tonumber(ARGV[start0 + i]), ['end'] = tonumber(ARGV[end0 + i]) }
    local limit = ARGV[limit0 + i]
    if limit ~= '' then
      local used = num(wkey, 'u', call('HGET', wkey, 'u') or '0')
      if used + tonumber(add) > tonumber(limit) then
        return nil, nil, { 'quota', KINDS[i], ARGV[end0 + i] }
      end
    end
  end
  local obs = hgetall(obs_key)
  if next(obs) ~= nil then
    if obs.rrat and num(obs_key, 'rrat', obs.rrat) <= now then
      obs.rr, obs.rrat = obs.lr, nil
      call('HDEL', obs_key, 'rrat', 'rr')
      if obs.rr then
        call('HSET', obs_key, 'rr', obs.rr)
      end
    end
    if obs.rtat and num(obs_key, 'rtat', obs.rtat) <= now then
      obs.rt, obs.rtat = obs.lt, nil
      call('HDEL', obs_key, 'rtat', 'rt')
      if obs.rt then
        call('HSET', obs_key, 'rt', obs.rt)
      end
    end
    if obs.rr and num(obs_key, 'rr', obs.rr) == 0 and obs.rrat then
      return nil, nil, { 'quota', 'rpm', obs.rrat }
    end
    if tokens > 0 and obs.rt and num(obs_key, 'rt', obs.rt) == 0 and obs.rtat then
      return nil, nil, { 'quota', 'tpm', obs.rtat }
    end
  end
  return windows, obs
end

-- Counts the request and its tokens in the windows and the observation that
-- check_key returned.
local function charge_key(windows, obs_key, obs, tokens)
  for i = 1, 5 do
    local w = windows[i]
    call('HINCRBY', w.key, 'u', w.add)
    -- Kept one more window length, so the next window can tell whether this one ran
    -- out. The expiry is absolute (window end + one length), so it is set once, by
    -- the window's first charge.
    if call('HINCRBY', w.key, 's', 1) == 1 then
      call('PEXPIREAT', w.key, fmt(w['end'] + (w['end'] - w.start) + 1000))
    end
  end
  if next(obs) ~= nil then
    if obs.rr then
      call('HSET', obs_key, 'rr', fmt(math.max(num(obs_key, 'rr', obs.rr) - 1, 0)))
    end
    if obs.rt then
      call('HSET', obs_key, 'rt', fmt(math.max(num(obs_key, 'rt', obs.rt) - tokens, 0)))
    end
  end
end
