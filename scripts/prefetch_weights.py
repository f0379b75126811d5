"""Download pretrained weights into the local caches, for machines that will train offline.

    python scripts/prefetch_weights.py resnet50 vit_b_16 timm:convnext_nano
    python scripts/prefetch_weights.py resnet50=IMAGENET1K_V1

Run it on a connected machine, then copy $TORCH_HOME/hub (torchvision) and $HF_HOME (timm),
by default ~/.cache/torch/hub and ~/.cache/huggingface, to the same place on the offline one.
"""

from __future__ import annotations

import argparse

import torch

from transferkit.backbones import build_backbone
from transferkit.errors import UserError


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "models", nargs="+", help="model.name values, optionally =<weights> (default: DEFAULT / true)"
    )
    args = parser.parse_args()
    failed = 0
    for spec in args.models:
        name, _, weights = spec.partition("=")
        try:
            build_backbone(name, weights or (True if name.startswith("timm:") else "DEFAULT"))
            print(f"ok      {spec}")
        except UserError as error:
            failed += 1
            print(f"failed  {spec}: {error}")
    print(f"torch hub cache: {torch.hub.get_dir()}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
