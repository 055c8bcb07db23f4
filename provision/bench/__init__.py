"""`invoke bench` and what `invoke tune` shares with it, one room per job:

* `flags`   -- llama-bench command lines from the service's flags (`-ts a/b`, `-fa 1`, ...)
* `parse`   -- parsers of what a run prints: llama-bench JSON, --progress phases, power samples,
               the sectioned output of one point, the split modes a `--help` lists
* `results` -- points, power and tokens/kWh, the seed's baseline, tables, JSON/CSV/PNG files
* `run`     -- the rig runner: llama-bench under setsid with a power sampler, Ctrl-C kills it
* `guard`   -- what a bench/tune borrows from the rig (the service, power limits) and puts back
* `ttft`    -- TTFT through the running llama-server (provision/remote/http_probe.py ttft)
* `sweep`   -- the bench itself on one host (`run_bench`)
"""
