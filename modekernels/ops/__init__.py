"""The ``torch.library`` ops of modekernels: schema, fake kernels, autograd and dispatch."""
