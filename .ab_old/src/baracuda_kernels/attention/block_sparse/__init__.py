"""Block-sparse scaled-dot-product attention: plan, autograd, launchers, kernels."""
