"""A frozen backbone's features: computed once and cached (`cache`), in the precision the run
chooses (`precision`)."""

from transferkit.features.cache import FeatureSet
from transferkit.features.frozen import FrozenFeatures

__all__ = ["FeatureSet", "FrozenFeatures"]
