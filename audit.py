"""Audit a dataset: `python audit.py data=imagefolder data.root=PATH`: leaks, duplicates, wrong labels."""

from pathlib import Path

import hydra

from transferkit.tasks.audit import main

if __name__ == "__main__":
    hydra.main(version_base="1.3", config_path=str(Path(__file__).parent / "conf"), config_name="audit")(
        main
    )()
