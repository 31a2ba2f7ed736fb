"""numpy samplers for SD 1.x, each a drop-in twin of a diffusers scheduler built with
`from_config(sd_scheduler_config)`. Pick one by name with `make_scheduler`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import SD15_SCHEDULER, Scheduler, SchedulerConfig
from .ddim import DDIMScheduler
from .dpmpp_2m import DPMSolverPP2MKarrasScheduler, DPMSolverPP2MScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lcm import LCMScheduler
from .pndm import PNDMScheduler
from .tcd import TCDScheduler

_REGISTRY: dict[str, type[Scheduler]] = {
    cls.name: cls
    for cls in (
        DDIMScheduler,
        PNDMScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
        DPMSolverPP2MScheduler,
        DPMSolverPP2MKarrasScheduler,
        LCMScheduler,
        TCDScheduler,
    )
}
SCHEDULERS: tuple[str, ...] = tuple(_REGISTRY)


def make_scheduler(name: str, config: Mapping[str, Any]) -> Scheduler:
    """Build sampler `name` from a diffusers scheduler_config dict (e.g. SD's PNDM config); keys it
    lacks take the diffusers class's defaults, as `DiffusersClass.from_config(config)` does."""
    if name not in _REGISTRY:
        raise ValueError(f"scheduler name {name!r} is unknown; allowed names: {', '.join(SCHEDULERS)}")
    cls = _REGISTRY[name]
    return cls(SchedulerConfig.from_dict({**cls.config_defaults, **config}))


__all__ = ["SCHEDULERS", "SD15_SCHEDULER", "Scheduler", "SchedulerConfig", "make_scheduler"]
