"""Serve a model over HTTP: `python serve.py ckpt_path=logs/train/runs/<run>/checkpoints/best.ckpt`."""

from pathlib import Path

import hydra

from transferkit.tasks.serve import main

if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path=str(Path(__file__).parent / "conf"), config_name="serve")(
        main
    )()
