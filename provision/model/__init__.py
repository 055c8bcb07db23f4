"""The model on a rig, in rooms: `hub` (what the hub has, asked from this machine), `store` (the
versioned layout on the rig and what is there now), `transfer` (download, hash, verify, mark
verified -- reusable pieces), `update` (`invoke model.update`), `tasks` (`model.verify`,
`model.status`). The provisioning step itself is `provision.steps.model`."""
