"""``nn.Module`` losses built only from the ops, one module per method."""
from .mgc import MGCLoss

__all__ = ["MGCLoss"]
