"""One public op per module: signature, input checks, backend dispatch and the torch.library
registration (custom op, fake kernel, autograd) that makes it traceable by torch.compile."""
