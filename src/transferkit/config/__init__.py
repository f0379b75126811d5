"""Objects from config: `build` (Hydra's instantiate with user errors kept as themselves) and
the type check every task runs first (`types.check_config`)."""
