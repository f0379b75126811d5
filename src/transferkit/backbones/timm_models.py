"""timm models as backbones: `timm.create_model(name, num_classes=0)` already is one."""

from __future__ import annotations

import logging
import math
import os
import socket
from contextlib import contextmanager
from urllib.parse import urlparse

import timm
from timm.data import resolve_data_config

from transferkit.backbones.base import TIMM_PREFIX, Backbone, unknown_model
from transferkit.backbones.preprocessing import CROP_MODES, Preprocessing
from transferkit.backbones.weights import (
    OFFLINE_FIX,
    Complete,
    fetch,
    is_path,
    load_backbone_weights,
    load_positional,
    normalise,
    read_state_dict,
    shipped_state_dict,
)
from transferkit.errors import WeightsError

log = logging.getLogger(__name__)


def _reachable(url: str | None, timeout: float = 3.0) -> bool:
    """A quick look before huggingface_hub's minute of retries; behind a proxy or a mirror we
    cannot tell, so the download is simply tried."""
    if any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT")
    ):
        return True
    host = urlparse(url or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def hub_cache_only():
    """Make huggingface_hub look only in its cache, so an offline miss fails at once instead of
    after its retries (about a minute)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _create_pretrained(name: str):
    def create():
        return timm.create_model(name, pretrained=True, num_classes=0)

    try:
        with hub_cache_only():
            return create()
    except Exception:  # noqa: BLE001 - not cached (or not on the hub): try the network below
        pass
    from huggingface_hub import constants

    cfg = timm.models.get_pretrained_cfg(name)
    url = getattr(cfg, "url", None) if cfg is not None and not getattr(cfg, "hf_hub_id", None) else None
    if constants.HF_HUB_OFFLINE or not _reachable(url):
        raise WeightsError(
            f"Cannot get the weights timm:{name}: they are not in the cache and the network is unreachable. "
            f"{OFFLINE_FIX}"
        )
    return fetch(f"timm:{name}", create)


def _crop_mode(cfg: dict) -> str:
    """timm's crop mode for these weights; one a newer timm adds and we do not reproduce yet
    falls back to the centre crop, with a warning, rather than making the model unusable."""
    mode = cfg.get("crop_mode") or "center"
    if mode not in CROP_MODES:
        log.warning("timm's crop_mode=%r is not one of %s; evaluating with a centre crop.", mode, CROP_MODES)
        return "center"
    return mode


def _preprocessing(model) -> Preprocessing:
    """timm's evaluation config for the weights: size, crop ratio, normalisation, interpolation
    and crop mode (squash for dm_nfnet and many CLIP fine-tunes, border for a few)."""
    cfg = resolve_data_config({}, model=model)
    size = cfg["input_size"][-1]
    return Preprocessing(
        image_size=size,
        resize_size=math.floor(size / cfg["crop_pct"]),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        crop_mode=_crop_mode(cfg),
    )


def feature_width(model) -> int:
    """The width of what the model returns with `num_classes=0`.

    timm's `num_features` is the last stage's width; the pooled features come out of the head's
    own layers (MobileNetV3's and GhostNet's conv_head, a pre-logits fc), at `head_hidden_size`,
    which is 1024, not 288, for mobilenetv3_small_050.
    """
    return getattr(model, "head_hidden_size", None) or model.num_features


def build_timm_backbone(name: str, weights: str | bool | None, complete: Complete | None = None) -> Backbone:
    if not timm.is_model(name.split(".")[0]):
        raise unknown_model(TIMM_PREFIX + name)
    weights = normalise(weights)
    if weights is True:
        model = _create_pretrained(name)
    elif weights == "shipped":
        model = timm.create_model(name, pretrained=False)
        load_positional(model, shipped_state_dict(name), f"the shipped weights of {name}")
        model.reset_classifier(0)
    elif weights is None or is_path(weights):
        model = timm.create_model(name, pretrained=False, num_classes=0)
        if weights is not None:
            classifier = model.pretrained_cfg.get("classifier", "head")
            load_backbone_weights(model, read_state_dict(weights, complete), weights, dropped=(classifier,))
    else:
        raise WeightsError(
            f"model.weights={weights!r} means nothing for timm:{name}; use true (timm's pretrained tag; "
            f"pick another tag with model.name=timm:{name.split('.')[0]}.<tag>), shipped, a path, or null."
        )
    return Backbone(model, feature_width(model), _preprocessing(model))
