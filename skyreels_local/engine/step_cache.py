"""The `turbo` preset's step caches, as named options (`--step-cache`), on diffusers' hooks.

| option | decides from | reuses on random weights | diffusers hook |
|---|---|---|---|
| `fbcache` (default) | the first block's residual change vs `--turbo-threshold` | ~nothing (threshold rule) | FirstBlockCache |
| `taylorseer` | a fixed schedule: warm-up, then one computed step per interval | what the schedule says | TaylorSeer, lite |
| `magcache` | shipped magnitude ratios (HunyuanVideo's, step_caches.toml) | what the ratios say | MagCache |

Each cache keeps one state per CFG branch (the loop runs each branch in its own
`transformer.cache_context`, denoise.py). A `StepCache` counts, per branch, the forwards that
ran the blocks and those that reused them: the denoising loop calls it (`on_forward`) inside the
branch's context right after the forward, when the hooks have decided.

Schedule-based caches (`taylorseer`, `magcache`) decide from the step index alone: the same on
real and random weights, so the benchmark can time `turbo` end to end, and the same on every
rank of a `--gpus-per-video` group with no communication. `fbcache` reads activations; under
Ulysses its decision is all-reduced (parallel.agree_step_cache). Quality on real weights is
the methods' published figure (README), not measured here.
"""

from __future__ import annotations

import math
import tomllib
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from ..preset_names import STEP_CACHES, validate_step_cache

PROFILE_PATH = Path(__file__).with_name("step_caches.toml")


@cache
def load_profile(path: Path = PROFILE_PATH) -> dict[str, dict[str, Any]]:
    """The step caches' parameters (step_caches.toml): one table per option."""
    data = tomllib.loads(path.read_text())
    missing = [name for name in STEP_CACHES if name not in data]
    if missing:
        raise ValueError(f"{path} has no table for step caches {missing}")
    return data


# --- the schedules, as pure functions (tests and the benchmark predict the counts) -----------


@dataclass(frozen=True)
class TaylorSeerSchedule:
    cache_interval: int
    warmup_steps: int
    max_order: int = 1

    @classmethod
    def from_profile(cls, table: dict[str, Any]) -> TaylorSeerSchedule:
        return cls(int(table["cache_interval"]), int(table["warmup_steps"]), int(table.get("max_order", 1)))

    def computes(self, step: int) -> bool:
        """diffusers' TaylorSeerCacheHook rule for 0-based step `step`."""
        if step < self.warmup_steps:
            return True
        return (step - self.warmup_steps - 1) % self.cache_interval == 0

    def computed_steps(self, num_steps: int) -> list[bool]:
        return [self.computes(step) for step in range(num_steps)]


@dataclass(frozen=True)
class MagCacheSchedule:
    ratios: tuple[float, ...]
    threshold: float
    max_skip_steps: int
    retention_ratio: float

    @classmethod
    def from_profile(cls, table: dict[str, Any]) -> MagCacheSchedule:
        return cls(
            tuple(float(r) for r in table["ratios"]),
            float(table["threshold"]),
            int(table["max_skip_steps"]),
            float(table["retention_ratio"]),
        )

    def ratios_for(self, num_steps: int) -> torch.Tensor:
        """The ratios resampled to `num_steps` exactly as diffusers' MagCacheConfig does."""
        from diffusers.hooks.mag_cache import nearest_interp

        ratios = torch.tensor(self.ratios)
        return ratios if len(ratios) == num_steps else nearest_interp(ratios, num_steps)

    def computed_steps(self, num_steps: int) -> list[bool]:
        """diffusers' MagCacheHeadHook rule, step by step (it reads nothing but these numbers)."""
        ratios = self.ratios_for(num_steps)
        retention = int(self.retention_ratio * num_steps + 0.5)
        ratio, err, skipped, have_residual = 1.0, 0.0, 0, False
        out = []
        for step in range(num_steps):
            compute = True
            if step >= retention:
                ratio *= float(ratios[step]) if step < len(ratios) else 1.0
                skipped += 1
                err += abs(1.0 - ratio)
                if have_residual and err <= self.threshold and skipped <= self.max_skip_steps:
                    compute = False
                else:
                    ratio, err, skipped = 1.0, 0.0, 0
            out.append(compute)
            have_residual = have_residual or compute
        return out


# --- the caches on a transformer -------------------------------------------------------------


class StepCache:
    """A step cache installed on a transformer, with per-branch counts of computed/reused forwards."""

    option = ""  # the --step-cache name
    method = ""  # what it is, for the prediction record

    def __init__(self) -> None:
        self.computed: Counter[str] = Counter()
        self.reused: Counter[str] = Counter()

    def __call__(self, branch: str) -> None:
        (self.computed if self._computed_last_forward() else self.reused)[branch] += 1

    def _computed_last_forward(self) -> bool:
        raise NotImplementedError

    def planned_computed(self, num_steps: int) -> list[bool] | None:
        """Which steps compute, for schedule-based caches (None: it depends on activations)."""
        return None

    def reset(self) -> None:
        self.computed.clear()
        self.reused.clear()

    @property
    def forwards(self) -> int:
        return sum(self.computed.values()) + sum(self.reused.values())

    @property
    def reuse_fraction(self) -> float:
        total = self.forwards
        return sum(self.reused.values()) / total if total else math.nan

    def describe(self) -> str:
        return self.method


def _enable(transformer: torch.nn.Module, config: Any) -> None:
    if transformer.is_cache_enabled:
        transformer.disable_cache()
    transformer.enable_cache(config)


def _hooks_named(transformer: torch.nn.Module, name: str) -> list[Any]:
    from diffusers.hooks import HookRegistry

    return [
        hook
        for module in transformer.modules()
        if hasattr(module, "_diffusers_hook")
        and (hook := HookRegistry.check_if_exists_or_initialize(module).get_hook(name))
    ]


def _one(hooks: list[Any], what: str) -> Any:
    if len(hooks) != 1:
        raise RuntimeError(f"expected one {what} hook, found {len(hooks)}")
    return hooks[0]


class FirstBlockCache(StepCache):
    """First Block Cache: a step whose first-block residual moved less than `threshold`
    (relative mean absolute change) reuses the rest of the network from the previous step."""

    option = "fbcache"
    method = "first-block-cache"

    def __init__(self, transformer: torch.nn.Module, threshold: float) -> None:
        super().__init__()
        from diffusers.hooks import FirstBlockCacheConfig
        from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

        _enable(transformer, FirstBlockCacheConfig(threshold=threshold))
        self._head = _one(_hooks_named(transformer, _FBC_LEADER_BLOCK_HOOK), "First Block Cache head")

    @property
    def threshold(self) -> float:
        return float(self._head.threshold)

    @threshold.setter
    def threshold(self, value: float) -> None:
        if not value >= 0:
            raise ValueError(f"cache threshold must be >= 0, got {value!r}")
        self._head.threshold = value

    def _computed_last_forward(self) -> bool:
        return bool(self._head.state_manager.get_state().should_compute)

    def describe(self) -> str:
        return f"{self.method} threshold={self.threshold:g}"


class TaylorSeerCache(StepCache):
    """TaylorSeer, lite: on a predicted step the blocks are skipped and the final projection's
    output is extrapolated from the last computed steps (step_caches.toml says why lite)."""

    option = "taylorseer"
    method = "taylorseer-lite"

    def __init__(self, transformer: torch.nn.Module, schedule: TaylorSeerSchedule) -> None:
        super().__init__()
        from diffusers.hooks import TaylorSeerCacheConfig
        from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

        self.schedule = schedule
        _enable(
            transformer,
            TaylorSeerCacheConfig(
                cache_interval=schedule.cache_interval,
                disable_cache_before_step=schedule.warmup_steps,
                max_order=schedule.max_order,
                # The cached output is one small tensor in lite mode: keep it exact.
                taylor_factors_dtype=torch.float32,
                use_lite_mode=True,
            ),
        )
        # The final projection's hook is the one that predicts: its state tells the decision.
        registry = getattr(transformer.proj_out, "_diffusers_hook", None)
        self._witness = registry.get_hook(_TAYLORSEER_CACHE_HOOK) if registry is not None else None
        if self._witness is None:
            raise RuntimeError("TaylorSeer lite did not hook the transformer's proj_out")

    def _computed_last_forward(self) -> bool:
        state = self._witness.state_manager.get_state()
        return state.last_update_step == state.current_step

    def planned_computed(self, num_steps: int) -> list[bool]:
        return self.schedule.computed_steps(num_steps)

    def describe(self) -> str:
        s = self.schedule
        return f"{self.method} interval={s.cache_interval} warmup={s.warmup_steps} order={s.max_order}"


class MagCache(StepCache):
    """MagCache with shipped magnitude ratios; follows each generation's step count."""

    option = "magcache"
    method = "magcache"

    def __init__(self, transformer: torch.nn.Module, schedule: MagCacheSchedule) -> None:
        super().__init__()
        from diffusers.hooks import MagCacheConfig
        from diffusers.hooks.mag_cache import _MAG_CACHE_LEADER_BLOCK_HOOK

        self.schedule = schedule
        self.config = MagCacheConfig(
            threshold=schedule.threshold,
            max_skip_steps=schedule.max_skip_steps,
            retention_ratio=schedule.retention_ratio,
            num_inference_steps=len(schedule.ratios),
            mag_ratios=torch.tensor(schedule.ratios),
        )
        _enable(transformer, self.config)
        self._head = _one(_hooks_named(transformer, _MAG_CACHE_LEADER_BLOCK_HOOK), "MagCache head")
        # The hooks share `self.config`; its step count must be the generation's, which the
        # loop passes to cache_context: adopt it before each forward.
        self._handle = transformer.register_forward_pre_hook(self._follow_step_count)

    def _follow_step_count(self, _module: Any, _args: Any) -> None:
        context = self._head.state_manager._context
        steps = getattr(context, "num_inference_steps", None)
        if steps and steps != self.config.num_inference_steps:
            self.config.num_inference_steps = steps
            self.config.mag_ratios = self.schedule.ratios_for(steps)

    def remove(self) -> None:
        self._handle.remove()

    def _computed_last_forward(self) -> bool:
        return bool(self._head.state_manager.get_state().should_compute)

    def planned_computed(self, num_steps: int) -> list[bool]:
        return self.schedule.computed_steps(num_steps)

    def describe(self) -> str:
        s = self.schedule
        return (
            f"{self.method} threshold={s.threshold:g} K={s.max_skip_steps} retention={s.retention_ratio:g} "
            f"ratios=HunyuanVideo-544p"
        )


def install_step_cache(
    transformer: torch.nn.Module, option: str, *, threshold: float, profile: dict[str, Any] | None = None
) -> StepCache:
    """Put step cache `option` on `transformer` (replacing any other); `threshold` is fbcache's."""
    validate_step_cache(option)
    profile = profile or load_profile()
    previous = getattr(transformer, "_skyreels_step_cache", None)
    if isinstance(previous, MagCache):
        previous.remove()
    if option == "fbcache":
        cache_: StepCache = FirstBlockCache(transformer, threshold)
    elif option == "taylorseer":
        cache_ = TaylorSeerCache(transformer, TaylorSeerSchedule.from_profile(profile["taylorseer"]))
    else:
        cache_ = MagCache(transformer, MagCacheSchedule.from_profile(profile["magcache"]))
    transformer._skyreels_step_cache = cache_
    return cache_


def remove_step_cache(transformer: torch.nn.Module) -> None:
    """Take the step cache off (the benchmark measures several on one model)."""
    previous = getattr(transformer, "_skyreels_step_cache", None)
    if isinstance(previous, MagCache):
        previous.remove()
    transformer._skyreels_step_cache = None
    if transformer.is_cache_enabled:
        transformer.disable_cache()
