-- kv-routed.lua: ../shared/bench/kv.lua's put workload as a client that knows the shard
-- map would send it: each wrk process talks to one node and writes only keys whose
-- group that node leads (bench/put-shards.sh, ROUTED=1), so that no write is forwarded.
-- BENCH_NODE names the node; BENCH_LEADERS lists, slot by slot of the cluster's shard
-- list (groups 2, 3, ... as a cluster formed with --shards lays them out), each group's
-- leader; the key's slot is its 64-bit FNV-1a hash modulo the slot count, as in
-- src/sharding.rs. Keys are its own (10 bytes, a key order per node), values 256 bytes as
-- kv.lua's.
dofile("../shared/bench/kv.lua")

local bit = require("bit")
local NODE = tonumber(os.getenv("BENCH_NODE"))
local leaders = {}
for leader in string.gmatch(os.getenv("BENCH_LEADERS"), "%d+") do leaders[#leaders + 1] = tonumber(leader) end

local function slot_of(key)
  local hash = 0xcbf29ce484222325ULL
  for i = 1, #key do
    hash = bit.bxor(hash, key:byte(i))
    hash = hash * 0x100000001b3ULL
  end
  return tonumber(hash % #leaders) + 1
end

-- This node's keys: its share of a key order of its own (kv.lua's is local to it).
math.randomseed(43 + NODE)
local mine = {}
while #mine < 30000 do
  local key = string.format("r%d-%07d", NODE, math.random(9999999))
  if leaders[slot_of(key)] == NODE then mine[#mine + 1] = key end
end
local value = string.rep("v", 256)

function request()
  issued = issued + 1
  return wrk.format("PUT", "/" .. mine[issued % #mine + 1], nil, value)
end
