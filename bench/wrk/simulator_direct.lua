-- The upstream alone: the HTTP simulator's /v1/chat/completions with the same load,
-- for comparison with scenario 4.
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

local prefix = '{"model":"simulator","max_tokens":1024,"messages":['
  .. '{"role":"system","content":"You are a helpful, concise assistant."},'
  .. '{"role":"user","content":"'

function request()
  local body = prefix .. bench.unique_message() .. '"}]}'
  return wrk.format("POST", "/v1/chat/completions", nil, body)
end
