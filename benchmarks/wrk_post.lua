-- wrk script: POST JSON bodies read from a file (one per line, cycled), and print the
-- summary as one JSON line prefixed with "WRKJSON " so run.py can parse it.
-- Usage: wrk -s wrk_post.lua ... URL -- BODIES_FILE [BEARER_TOKEN]

local requests = {}
local n = 0

function init(args)
  local headers = { ["Content-Type"] = "application/json" }
  if args[2] then
    headers["Authorization"] = "Bearer " .. args[2]
  end
  local f = assert(io.open(args[1], "r"))
  for line in f:lines() do
    if #line > 0 then
      requests[#requests + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  f:close()
  assert(#requests > 0, "no request bodies in " .. args[1])
end

function request()
  n = n % #requests + 1
  return requests[n]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, '
    .. '"read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
    .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
