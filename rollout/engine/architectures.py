"""The Llama family as one shape description, read from a transformers config: kept here for the engine's imports.

The definitions live in rollout/layers.py, beside the layer math that the engine and the parametric drafter share
(that module says why it sits outside rollout/engine/).
"""

from __future__ import annotations

from rollout.layers import (
    ARCHITECTURES,
    STATIC_ROPE_TYPES,
    ArchSpec,
    ModelShape,
    rope_tables,
    shape_from_config,
)

__all__ = ["ARCHITECTURES", "STATIC_ROPE_TYPES", "ArchSpec", "ModelShape", "rope_tables", "shape_from_config"]
