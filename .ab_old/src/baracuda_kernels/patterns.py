"""Pattern builders, re-exported: ``from baracuda_kernels.patterns import sliding_window``.

The implementation lives with its op family in ``baracuda_kernels.attention.patterns``.
"""

from .attention.patterns import *  # noqa: F401,F403
from .attention.patterns import __all__  # noqa: F401
