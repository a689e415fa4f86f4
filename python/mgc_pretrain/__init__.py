"""mgc_pretrain: the reference pretraining program of mgc_kernels (MGC, DenseCL, SMoG, ADCLR, MCL
on a timm ViT), runnable on a laptop CPU and with torchrun on many GPUs."""

__version__ = "0.1.0"
