"""Integrations of baracuda_kernels with model libraries.

``baracuda_kernels.integrations.transformers``: a Hugging Face transformers attention
implementation (``register()``, then ``attn_implementation="baracuda"``). Importing this
package imports no third-party library; ``register`` imports transformers when called.
"""

from .transformers import HFAttention, register

__all__ = ["HFAttention", "register"]
