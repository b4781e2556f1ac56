"""`deepfleet sweep`: a grid (or a seeded random sample of it) of recipe overrides, each trial trained
by `deepfleet train` into its own dir under the sweep dir, ranked by validation loss, resumable."""
