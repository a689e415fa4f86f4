"""mgc_kernels: fused kernels and losses for multi-grained and dense contrastive SSL."""

from . import backends, distributed, heads, transforms
from ._checks import set_value_checks
from .losses import (
    ADCLRLoss,
    DenseCLLoss,
    MCLLoss,
    MGCLoss,
    SMoGGroups,
    SMoGLoss,
    dense_argmax_match,
    query_attention_mask,
    spherical_kmeans,
)
from .momentum import cosine_momentum, momentum_copy, update_momentum
from .ops.correspondence import correspondence
from .ops.geometric_info_nce import geometric_info_nce
from .ops.info_nce import info_nce
from .ops.linear_soft_ce import linear_soft_ce
from .ops.multigrain_pool import multigrain_pool
from .ops.region_boxes import region_boxes
from .ops.sample_pairs import Pairs, sample_pairs

__version__ = "0.1.0"

__all__ = [
    "ADCLRLoss",
    "DenseCLLoss",
    "MCLLoss",
    "MGCLoss",
    "Pairs",
    "SMoGGroups",
    "SMoGLoss",
    "backends",
    "correspondence",
    "cosine_momentum",
    "dense_argmax_match",
    "distributed",
    "geometric_info_nce",
    "heads",
    "info_nce",
    "linear_soft_ce",
    "momentum_copy",
    "multigrain_pool",
    "query_attention_mask",
    "region_boxes",
    "sample_pairs",
    "set_value_checks",
    "spherical_kmeans",
    "transforms",
    "update_momentum",
]
