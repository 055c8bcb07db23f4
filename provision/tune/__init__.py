"""`invoke tune`, one room per job:

* `options`        -- the options and their parsers (`parse_pairs`, `parse_watts`, `parse_keep`, ...)
* `significance`   -- the one rule that separates a gain from noise, and the interleaved rounds
* `session`        -- what every tune starts from on a host, the VRAM preflight of a candidate
* `batch`          -- -b/-ub pairs, -ts variants and split modes (`run_batch_tune`)
* `power`          -- the power-limit sweep, the knee, tokens/kWh (`run_power_tune`)
* `inventory_edit` -- `--apply`: the minimal text edit of hosts.yaml
"""
