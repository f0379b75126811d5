"""One function turns a model name into a feature extractor that answers the same questions.

    build_backbone("resnet18", "DEFAULT")            # any torchvision classification model
    build_backbone("timm:convnext_nano", True)       # any timm model
    build_backbone("timm:tf_efficientnet_lite0", "shipped")   # weights from a pip package

Whatever the family's head looks like (fc, classifier[-1], heads.head, a conv classifier), the
result maps images (B, 3, H, W) to features (B, num_features) and says how to preprocess.
"""

from transferkit.backbones.base import Backbone, unknown_model
from transferkit.backbones.build import build_backbone

__all__ = ["Backbone", "build_backbone", "unknown_model"]
