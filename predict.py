"""Classify images: `python predict.py ckpt_path=PATH input=DIR_OR_FILE output=preds.csv`."""

from pathlib import Path

import hydra

from transferkit.tasks.predict import main

if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path=str(Path(__file__).parent / "conf"), config_name="predict")(
        main
    )()
