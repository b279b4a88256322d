local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[4])
local driven = now ~= nil
if not driven then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens, stamp = tonumber(state[1]), tonumber(state[2])
if tokens == nil then
  tokens, stamp = burst, now
end
if now < stamp then
  stamp = now
end
tokens = math.min(burst, tokens + (now - stamp) * rate)
stamp = now
local result
if ARGV[3] == 'reject' then
  if tokens >= 1 then
    tokens = tokens - 1
    result = 1
  else
    result = 0
  end
else
  tokens = tokens - 1
  local wait = 0
  if tokens < 0 then
    wait = -tokens / rate
  end
  result = math.floor(wait * 1000000 + 0.5)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'stamp', string.format('%.17g', stamp))
if not driven then
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil((burst - tokens) / rate * 1000)))
end
return result
