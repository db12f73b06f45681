-- wrk script for scripts/bench-embed.sh: POST /embed with one sentence per
-- request, cycling through a file of prepared JSON bodies (one per line), and
-- a one-line JSON summary with latency percentiles at the end.
--   wrk ... -s embed.lua URL -- BODIES_FILE
local bodies = {}
local idx = 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
  local path = args[1]
  for line in io.lines(path) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
  if #bodies == 0 then error("no request bodies in " .. tostring(path)) end
  -- wrk runs init once per thread: start threads at different bodies.
  idx = math.random(#bodies) - 1
end

function request()
  idx = idx % #bodies + 1
  return wrk.format("POST", "/embed", headers, bodies[idx])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"mean_us":%.1f,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency.mean,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
