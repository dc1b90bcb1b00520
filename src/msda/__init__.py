"""msda: multi-scale deformable attention with compiled CPU and CUDA kernels.

Public API:

* :func:`ms_deform_attn`: the differentiable op (``torch.ops.msda.*``).
* :func:`ms_deform_attn_reference`: the pure-PyTorch ``grid_sample`` version.
* :class:`MSDeformAttnFunction`: the original ``apply(..., im2col_step)`` convention.
* :class:`MSDeformAttn`: the drop-in module of Deformable DETR.
"""

from ._version import __version__
from .function import MSDeformAttnFunction
from .module import MSDeformAttn
from .ops import ms_deform_attn
from .reference import ms_deform_attn_reference

__all__ = [
    "__version__",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "MSDeformAttnFunction",
    "MSDeformAttn",
]
