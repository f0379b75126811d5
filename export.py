"""Export a checkpoint: `python export.py ckpt_path=PATH format=onnx|torchscript`."""

from pathlib import Path

import hydra

from transferkit.tasks.export import main

if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path=str(Path(__file__).parent / "conf"), config_name="export")(
        main
    )()
