"""mgc_pretrain: the reference pretraining program of mgc_kernels (MGC, DenseCL, SMoG, ADCLR, MCL
on a timm ViT), runnable on a laptop CPU and with torchrun on many GPUs."""

from mgc_kernels import __version__  # one distribution, one version

__all__ = ["__version__"]
