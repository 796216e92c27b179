"""Pieces shared by the attention ops: op kinds, kernel helpers (head-dim tiles, list
strides, accumulator dtype, the softmax-scale handoff to kernels), TMA loads and the Triton
backend's availability rule."""
