-- I/O floor with a unique message per request (its Redis GET misses).
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

function request()
  return bench.post(bench.body(bench.unique_message()))
end
