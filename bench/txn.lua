-- txn.lua: a put workload where each put is a transaction: compare the key's revision
-- (etcd's mod_revision) against a bound it is always below, then put the key in the
-- success branch (a get of it in the failure branch, which never runs). Both systems
-- evaluate the compare where the entry is applied and write through raft, so this
-- measures a transaction's whole path: etcd's `POST /v3/kv/txn` on its JSON gateway,
-- raftkvd's `POST /v1/txn`. A 200 whose transaction did not succeed is counted in
-- "empty" (the bench would be wrong). Keys: 100,000 of 10 bytes in a shuffled order
-- that the threads walk (as kv.lua's puts); values 256 bytes. The rest (counting,
-- setup, the BENCH line) is ../shared/bench/kv.lua's, with its environment
-- (BENCH_SYSTEM, BENCH_THREADS, BENCH_CONNS, BENCH_WORKLOAD).
dofile("../shared/bench/kv.lua")

local SYSTEM = os.getenv("BENCH_SYSTEM") or "etcd"
local THREADS = tonumber(os.getenv("BENCH_THREADS") or "1")
local BOUND = "4611686018427387904" -- 2^62: above any revision either system reaches

math.randomseed(44)
local order = {}
for i = 1, 100000 do order[i] = string.format("t%09d", i - 1) end
for i = #order, 2, -1 do local j = math.random(i); order[i], order[j] = order[j], order[i] end
local value = string.rep("v", 256)

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(s) -- for inputs whose length is a multiple of 3 (no padding)
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + b * 256 + c
    for _, v in ipairs({ math.floor(n / 262144), math.floor(n / 4096) % 64, math.floor(n / 64) % 64, n % 64 }) do
      out[#out + 1] = B64:sub(v + 1, v + 1)
    end
  end
  return table.concat(out)
end
local value64 = b64(value .. "vv") -- 258 bytes, so that no padding is needed
local json = { ["Content-Type"] = "application/json" }

function request()
  local k = order[(id + issued * THREADS) % #order + 1]
  issued = issued + 1
  if SYSTEM == "etcd" then
    local key = b64(k .. "xx") -- 12 bytes
    return wrk.format("POST", "/v3/kv/txn", json,
      '{"compare":[{"key":"' .. key .. '","target":"MOD","result":"LESS","mod_revision":"' .. BOUND .. '"}],'
      .. '"success":[{"request_put":{"key":"' .. key .. '","value":"' .. value64 .. '"}}],'
      .. '"failure":[{"request_range":{"key":"' .. key .. '"}}]}')
  end
  return wrk.format("POST", "/v1/txn", json,
    '{"compare":[{"key":"' .. k .. 'xx","op":"<","revision":' .. BOUND .. '}],'
    .. '"success":[{"put":{"key":"' .. k .. 'xx","value":"' .. value .. 'vv"}}],'
    .. '"failure":[{"get":{"key":"' .. k .. 'xx"}}]}')
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    statuses[status] = (statuses[status] or 0) + 1
  elseif not body:find('"succeeded":true', 1, true) then
    empty = empty + 1
  end
end
