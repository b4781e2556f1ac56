"""Launch: per-host command builders (pure: argv + env), backends, supervisor."""
