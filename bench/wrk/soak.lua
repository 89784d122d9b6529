-- Soak: full path paced at BENCH_RATE requests/s in total (a delay before each request).
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

function request()
  return bench.post(bench.body(bench.unique_message()))
end

delay = bench.delay
