"""Fine-tune a pretrained image classifier: `python train.py model=vgg16 data=dogs_cats`."""

from pathlib import Path

import hydra

from transferkit.tasks.train import main

if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path=str(Path(__file__).parent / "conf"), config_name="train")(
        main
    )()
