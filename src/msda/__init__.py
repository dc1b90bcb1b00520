"""msda: multi-scale deformable attention with compiled CPU and CUDA kernels.

Public API:

* :func:`ms_deform_attn`: the differentiable op (``torch.ops.msda.*``).
* :func:`ms_deform_attn_reference`: the pure-PyTorch ``grid_sample`` version.
* :func:`ms_deform_attn_v2` / :func:`ms_deform_attn_v2_reference`: the RT-DETRv2 / D-FINE
  variant (points per level, discrete sampling) and its reference.
* :class:`MSDeformAttnFunction`: the original ``apply(..., im2col_step)`` convention.
* :class:`MSDeformAttn`: the drop-in module of Deformable DETR.
"""

from ._version import __version__
from .function import MSDeformAttnFunction
from .module import MSDeformAttn
from .ops import ms_deform_attn
from .ops_v2 import ms_deform_attn_v2
from .reference import ms_deform_attn_reference
from .reference_v2 import ms_deform_attn_v2_reference

__all__ = [
    "__version__",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "ms_deform_attn_v2",
    "ms_deform_attn_v2_reference",
    "MSDeformAttnFunction",
    "MSDeformAttn",
]
