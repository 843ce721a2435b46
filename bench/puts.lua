-- wrk script for bench/snapshot.sh and bench/rebalance.sh: PUT_TOTAL puts of 100-byte
-- values cycling over PUT_KEYS keys (/key0, /key1, ...). Two threads each send half, keys
-- interleaved; a thread stops after its last answer.
local n = tonumber(os.getenv("PUT_KEYS"))
local per_thread = math.ceil(tonumber(os.getenv("PUT_TOTAL")) / 2)
local value = string.rep("v", 100)
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
local sent, done = 0, 0
request = function()
  local i = sent * 2 + id
  sent = sent + 1
  return wrk.format("PUT", "/key" .. (i % n), nil, value)
end
response = function(status)
  done = done + 1
  if done >= per_thread then wrk.thread:stop() end
end
