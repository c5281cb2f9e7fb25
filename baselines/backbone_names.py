"""The backbone's stage names and init choices, importable without torch or timm.

Config dataclasses and `--help` use these (flag choices, `--layers` parsing); `baselines.backbone`
re-exports them beside the model, so either import works.
"""

from __future__ import annotations

from baselines.config import ConfigError

FEATURE_NAMES = ("feature1", "feature2", "feature3", "feature4", "feature5")
REDUCTIONS = (2, 4, 8, 16, 32)  # of feature1..feature5 at output stride 32
CONV_INITS = ("openselfsup", "timm")


def layer_list(text: str) -> tuple[str, ...]:
    """`feature3,feature5` or `all` -> the stage names; anything else is a one-line error."""
    if text == "all":
        return FEATURE_NAMES
    layers = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [layer for layer in layers if layer not in FEATURE_NAMES]
    if unknown or not layers:
        raise ConfigError(f"unknown layer(s) {unknown or text!r}: use feature1..feature5 or 'all'")
    return layers
