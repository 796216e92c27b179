"""Dense (optionally causal) scaled-dot-product attention with GQA behind the plan surface.

descriptor.py (FlashSdpaDescriptor, FlashSdpaArgs) -> plan.py (FlashSdpaPlan: backend
choice, run, run_backward; its docstring states the choice and the routing rule) ->
torch_sdpa.py (the library backends: torch SDPA forced to cuDNN / flash) or the block-sparse
plan with an all-active pattern (triton / reference); functional.py (flash_sdpa, autograd);
routing.py (dense_route: when a block-sparse call may run on a library backend);
library_autograd.py (autograd of the library backends).

The public names are re-exported by ``baracuda_kernels.attention``; this package __init__
imports nothing, so that block_sparse can import flash_sdpa.routing / library_autograd
(its dense route) without running flash_sdpa.functional, which imports block_sparse.
"""
