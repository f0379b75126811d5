"""Objects from config: `build` (Hydra's instantiate with user errors kept as themselves) and
the type check of every `_target_` node against what it builds (`types.check_types`, which each
task's main runs first through `tasks.settings.check_config`)."""
