"""The speed presets' names and defaults, importable without torch (CLI, settings, HTTP process).

What each preset does is in presets.py.
"""

from __future__ import annotations

from .errors import InvalidInputError

PRESETS = ("stock", "exact", "fp8", "turbo")
DEFAULT_PRESET = "exact"
# First Block Cache threshold for `turbo`: the relative change of the first block's residual
# below which a step reuses the cached rest of the network. diffusers' own default is 0.05 and
# its ParaAttention guide runs HunyuanVideo at 0.6; quality on real SkyReels weights decides.
DEFAULT_CACHE_THRESHOLD = 0.15
# The step cache `turbo` uses (engine/step_cache.py): fbcache (First Block Cache, a threshold on
# activations), taylorseer or magcache (fixed schedules, the same on random and real weights).
STEP_CACHES = ("fbcache", "taylorseer", "magcache")
DEFAULT_STEP_CACHE = "fbcache"


def validate_preset(name: str) -> str:
    if name not in PRESETS:
        raise InvalidInputError("preset", name, f"must be one of {', '.join(PRESETS)}")
    return name


def validate_step_cache(name: str) -> str:
    if name not in STEP_CACHES:
        raise InvalidInputError("step_cache", name, f"must be one of {', '.join(STEP_CACHES)}")
    return name
