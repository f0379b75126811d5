"""The command-line tasks (train, ...), each a function of a composed Hydra config."""
