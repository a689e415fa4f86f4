"""``nn.Module`` losses built only from the ops, one module per method."""
from .densecl import DenseCLLoss, dense_argmax_match
from .mcl import MCLLoss
from .mgc import MGCLoss
from .smog import SMoGGroups, SMoGLoss, spherical_kmeans

__all__ = ["DenseCLLoss", "MCLLoss", "MGCLoss", "SMoGGroups", "SMoGLoss", "dense_argmax_match",
           "spherical_kmeans"]
