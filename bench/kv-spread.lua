-- kv-spread.lua: ../shared/bench/kv.lua for one of several wrk processes that share one
-- key order, each on its own node (bench/put-shards.sh, SPREAD=1). Each process runs one
-- thread; BENCH_ID_OFFSET (0, 1, 2) makes it take its own positions of the order, as
-- wrk's threads 0, 1, 2 would with BENCH_THREADS=3, so no two processes write one key.
dofile("../shared/bench/kv.lua")

local offset = tonumber(os.getenv("BENCH_ID_OFFSET") or "0")
local shared_setup = setup
function setup(thread)
  shared_setup(thread)
  thread:set("id", thread:get("id") + offset)
end
