"""``nn.Module`` losses built only from the ops, one module per method."""

from .adclr import ADCLRLoss, query_attention_mask
from .densecl import DenseCLLoss, dense_argmax_match
from .mcl import MCLLoss
from .mgc import MGCLoss
from .smog import SMoGGroups, SMoGLoss, spherical_kmeans

__all__ = [
    "ADCLRLoss",
    "DenseCLLoss",
    "MCLLoss",
    "MGCLoss",
    "SMoGGroups",
    "SMoGLoss",
    "dense_argmax_match",
    "query_attention_mask",
    "spherical_kmeans",
]
