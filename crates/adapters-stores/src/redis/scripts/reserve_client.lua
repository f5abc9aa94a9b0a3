-- reserve_client: the client's part of a charge on Redis Cluster (the second of the
-- split reserve): counts the request in the client's minute unless the minute is
-- full. Touches only the client's counter (its own hash tag).
--
-- KEYS[1] the client's counter for this minute.
-- ARGV: 1 the client's rpm, 2 end of the minute.
--
-- Returns {'ok'} or {'client', retry_at}.

if tonumber(call('GET', KEYS[1]) or '0') >= tonumber(ARGV[1]) then
  return { 'client', ARGV[2] }
end
if call('INCR', KEYS[1]) == 1 then
  call('PEXPIREAT', KEYS[1], fmt(tonumber(ARGV[2]) + 60000))
end
return { 'ok' }
