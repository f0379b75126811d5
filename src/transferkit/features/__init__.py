"""A frozen backbone's features: computed once and cached (`cache`), in the precision the run
chooses (`precision`)."""

from transferkit.features.cache import FeatureSet
from transferkit.features.frozen import FrozenFeatures, training_augment

__all__ = ["FeatureSet", "FrozenFeatures", "training_augment"]
