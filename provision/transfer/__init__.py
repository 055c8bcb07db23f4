"""A second rig from the first: `invoke provision --host rig2 --from rig`.

* `source`      -- the source rig of a run: its connection (opened when first needed), a context
                   on it in check mode (its state is never written), what is read there. Attached
                   to each destination host's context by `Attach` (an engine before_host hook).
* `copy`        -- copies items (single files, directory trees) from the source onto the rig of a
                   context: DIRECT (the destination pulls over SSH from the source with a temporary,
                   restricted key) where the rigs reach each other, else RELAYED through this
                   machine (two SSH channels, streamed, nothing staged on disk). Read-only on the
                   source, paced by its `transfer.rate_limit_mb`. Helpers: remote/rig_copy.py,
                   remote/rig_keys.py.
* `model_copy`  -- the model step's part: which shards the source has VERIFIED with the sha256 this
                   rig wants (the hub's / the lock's), copy them, hash them here before they are
                   marked verified, anything that fails -> the hub; says where each shard came from.
* `build_copy`  -- the llama step's part: the source's build with this rig's fingerprint is copied
                   and smoke-tested before the switch, else the build here starts from the source's
                   ccache; says which path it took and why.

Trust is unchanged: the source rig is never an authority -- every byte copied is checked here
against what the hub (or the lock) says, exactly like a download.
"""
