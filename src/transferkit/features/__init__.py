"""A frozen backbone's features: computed once and cached (`cache`), in the precision the run
chooses (`precision`). The two names below load on first use, so a module that needs only
`features.precision` (predict, serve) does not import the cache and Lightning with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transferkit.features.cache import FeatureSet
    from transferkit.features.frozen import FrozenFeatures

__all__ = ["FeatureSet", "FrozenFeatures"]


def __getattr__(name: str) -> Any:
    if name == "FeatureSet":
        from transferkit.features.cache import FeatureSet

        return FeatureSet
    if name == "FrozenFeatures":
        from transferkit.features.frozen import FrozenFeatures

        return FrozenFeatures
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
