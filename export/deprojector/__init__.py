"""CLIP Text Deprojector: pooled CLIP embedding -> the 77 hidden states SD 1.x conditions on.

Public API (import from `export.deprojector`):
  DeprojectorConfig, TransformerDeprojector, VARIANTS, variant_config, from_clip   (v1..v5)
  VicinityConfig, VicinityDeprojector                                              (V model)
  ClipConstants, clip_constants, inverse_projection
  load_deprojector, save_deprojector, published_state_dict, CheckpointError
  Deprojector = TransformerDeprojector | VicinityDeprojector (what load_deprojector returns)
"""

from export.deprojector.checkpoint import (
    CheckpointError,
    Deprojector,
    load_deprojector,
    published_state_dict,
    save_deprojector,
)
from export.deprojector.transformer import (
    INPUT_KINDS,
    VARIANTS,
    ClipConstants,
    DeprojectorConfig,
    TransformerDeprojector,
    clip_constants,
    from_clip,
    inverse_projection,
    variant_config,
)
from export.deprojector.vicinity import VicinityConfig, VicinityDeprojector

__all__ = [
    "INPUT_KINDS",
    "VARIANTS",
    "CheckpointError",
    "Deprojector",
    "ClipConstants",
    "DeprojectorConfig",
    "TransformerDeprojector",
    "VicinityConfig",
    "VicinityDeprojector",
    "clip_constants",
    "from_clip",
    "inverse_projection",
    "load_deprojector",
    "published_state_dict",
    "save_deprojector",
    "variant_config",
]
