"""ONNX export of msda: what ``torch.onnx.export`` writes for the op.

Nothing to call for the default form: after ``import msda``, plain
``torch.onnx.export(model, args, f)`` (``dynamo=True``, the default, or
``dynamo=False``) exports every model that calls :func:`msda.ms_deform_attn`,
:class:`msda.MSDeformAttnFunction` or :class:`msda.MSDeformAttn`. While an
export runs (``torch.onnx.is_in_onnx_export()``), the op takes
:func:`decomposed_ms_deform_attn`, written with standard operators only, so
the exporters trace it like any PyTorch code and onnxruntime runs the result
with dynamic batch, queries and image sizes.

The one entry point for everything else is this module:

* :func:`tensorrt_plugin`: a context under which the op is exported as the
  single node ``MultiscaleDeformableAttnPlugin_TRT`` that TensorRT's plugin
  implements, instead of the decomposition.
* For users who run ``torch.export`` themselves and then export the
  ``ExportedProgram`` (there the op is already a ``torch.ops.msda`` node, which
  the exporter cannot look into): :func:`decompose` replaces those nodes by the
  decomposition (``ExportedProgram.run_decompositions``), and
  :func:`translation_table` is the ``custom_translation_table`` that writes
  them as TensorRT's node.

The decomposition follows the op's contract (documentation: "The op and the
module", edge cases) rather than
relying on the runtime: onnxruntime's GridSample returns non-zero values for
NaN, inf and 1e30 coordinates, so samples outside -1 < x < W, -1 < y < H are
masked here (their weight is replaced, not multiplied, so a NaN weight on an
outside point contributes zero), and the four bilinear corners are read with
gathers whose indices never leave their level.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Sequence
from typing import Any, Callable, Iterator, Optional

import torch

__all__ = [
    "decomposed_ms_deform_attn",
    "exporting",
    "export_form",
    "export_form_v2",
    "tensorrt_plugin",
    "translation_table",
    "decompose",
    "TENSORRT_OP",
    "TENSORRT_DOMAIN",
]

# TensorRT's plugin (TensorRT/plugin/multiscaleDeformableAttnPlugin): op type,
# plugin version "1", no attributes. The domain is ours: a node in the default
# domain fails onnx's checker, and TensorRT's parser finds plugins by op type.
TENSORRT_OP = "MultiscaleDeformableAttnPlugin_TRT"
TENSORRT_DOMAIN = "trt.plugins"
TENSORRT_DTYPES = (torch.float32, torch.float16)

# The form the op takes in an export: None for the decomposition, else the
# custom domain of the TensorRT node (set by tensorrt_plugin()).
_tensorrt_domain: Optional[str] = None


def _check_domain(domain: str) -> None:
    if not domain or domain == "ai.onnx":
        raise ValueError(f"domain must be a custom ONNX domain (onnx's checker rejects unknown ops in {domain!r})")


@torch.compiler.assume_constant_result
def exporting() -> bool:
    """``torch.onnx.is_in_onnx_export()``, also as seen by Dynamo.

    The dynamo exporter captures the model with ``torch.export`` (non-strict),
    and when that fails retries with Dynamo (strict), which folds
    ``is_in_onnx_export()`` to False: the retry would capture msda's kernel
    call, which ONNX cannot express, and the user would get the exporter's
    "No ONNX function found for msda..." instead of the first attempt's error.
    Evaluated at trace time (assume_constant_result), the retry takes the same
    export path as the first attempt: the decomposition, or msda's own error.
    """
    return torch.onnx.is_in_onnx_export()


@contextlib.contextmanager
def tensorrt_plugin(domain: str = TENSORRT_DOMAIN) -> Iterator[None]:
    """Export msda's op as TensorRT's ``MultiscaleDeformableAttnPlugin_TRT`` node.

    Usage::

        with msda.onnx.tensorrt_plugin():
            torch.onnx.export(model, args, "model.onnx", dynamo=True)

    The node takes value (N, S, M, D), spatial_shapes int32 (L, 2),
    level_start_index int32 (L,), sampling_locations (N, Lq, M, L, P, 2) and
    attention_weights (N, Lq, M, L, P), all floats in one dtype (float32 or
    float16: the graph casts them), and returns (N, Lq, M, D), which the graph
    reshapes to (N, Lq, M*D). Such a file runs in TensorRT (with its plugin
    library loaded), not in onnxruntime.

    Args:
        domain: the ONNX domain of the node (must not be the default domain "").
    """
    global _tensorrt_domain
    _check_domain(domain)
    previous, _tensorrt_domain = _tensorrt_domain, domain
    try:
        yield
    finally:
        _tensorrt_domain = previous


def export_form(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """What :func:`msda.ms_deform_attn` computes while ``torch.onnx.export`` runs:
    the TensorRT node under :func:`tensorrt_plugin`, the decomposition otherwise."""
    _register_torchscript_symbolics()
    if _tensorrt_domain is not None:
        out = _tensorrt_node(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, _tensorrt_domain
        )
    else:
        out = decomposed_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _refuse_gradients(out)


GRADIENT_ERROR = (
    "msda: a gradient reached msda's op while torch.onnx.export was tracing the model (torch.autograd.grad "
    "or .backward() inside the exported code). The ONNX form of msda's op is inference only: the exporters "
    "cannot write its backward (the TorchScript exporter stops on aten::select_backward, the dynamo exporter on "
    "fake tensors left in the program). Compute gradients outside the exported model, or export the model "
    "without them"
)


def _refuse_gradients(out: torch.Tensor) -> torch.Tensor:
    """Make a backward through the exported op fail with msda's message, not the exporter's.

    Both exporters trace with autograd on (parameters require grad), so
    requires_grad alone says nothing; a gradient arriving at the output does.
    """
    if out.requires_grad:

        def refuse(grad: torch.Tensor) -> torch.Tensor:
            raise RuntimeError(GRADIENT_ERROR)

        out.register_hook(refuse)
    return out


def export_form_v2(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    points_per_level: Sequence[int],
    method: str,
) -> torch.Tensor:
    """What :func:`msda.ms_deform_attn_v2` computes while ``torch.onnx.export`` runs
    with unequal points per level or the discrete method (equal points with the
    default method take v1's op, hence :func:`export_form`): the decomposition,
    or under :func:`tensorrt_plugin` an error, as TensorRT's plugin cannot express them."""
    _register_torchscript_symbolics()
    if _tensorrt_domain is not None:
        raise ValueError(_tensorrt_v2_error(list(points_per_level), method))
    from ._onnx_v2 import decomposed_ms_deform_attn_v2

    out = decomposed_ms_deform_attn_v2(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, points_per_level, method
    )
    return _refuse_gradients(out)


def _tensorrt_v2_error(points_per_level: list[int], method: str) -> str:
    return (
        f"msda.onnx.tensorrt_plugin: TensorRT's {TENSORRT_OP} takes the same number of points on every level "
        f"(> 0) and bilinear sampling; msda.ms_deform_attn_v2 was called with points_per_level={points_per_level} "
        f"and method={method!r}. Pad every level to max(points_per_level) points with zero attention weights "
        f"and use method='default', or export without tensorrt_plugin() (the decomposed form runs in onnxruntime)"
    )


def decomposed_ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """The op with standard operators only (elementwise, Floor, Where, Gather, MatMul).

    Same arguments and result as :func:`msda.ms_deform_attn`. No shape depends
    on the values of ``spatial_shapes`` or ``level_start_index`` (they are used
    as tensors in the index arithmetic), so the exported graph takes any image
    size; only L (levels) and P (points) are fixed by the traced shapes.

    For each level, every sample becomes four corner reads of the value rows
    ``(n*S + start_l + y*W_l + x)*M + m`` of ``value`` viewed as (N*S*M, D),
    weighted by (bilinear weight) x (attention weight), and summed with one
    batched MatMul over the 4*P corners of a head.
    """
    L = sampling_locations.shape[3]
    rows, locations, weights, shapes, starts, layout = _prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    out = None
    for level in range(L):
        part = _bilinear_level(
            rows, locations[:, :, :, level], weights[:, :, :, level], shapes[level], starts[level], layout
        )
        out = part if out is None else out + part
    assert out is not None  # L >= 1 (check_inputs)
    N, _, M, D = value.shape
    return out.reshape(N, sampling_locations.shape[1], M * D).to(value.dtype)


class _Layout:
    """Index helpers shared by every level: value's rows are (n*S + s)*M + m."""

    def __init__(self, value: torch.Tensor, compute: torch.dtype) -> None:
        N, S, M, _ = value.shape
        self.compute = compute
        self.batch_row = (torch.arange(N, device=value.device) * S).view(N, 1, 1, 1, 1)
        self.head = torch.arange(M, device=value.device).view(1, 1, M, 1, 1)
        self.M = M


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """value as rows (N*S*M, D) and the other inputs in the compute dtype / int64."""
    N, S, M, D = value.shape
    compute = torch.float64 if value.dtype == torch.float64 else torch.float32
    rows = value.to(compute).reshape(N * S * M, D)
    layout = _Layout(value, compute)
    return (
        rows,
        sampling_locations.to(compute),
        attention_weights.to(compute),
        spatial_shapes.to(torch.int64),
        level_start_index.to(torch.int64),
        layout,
    )


def _gather_weighted(rows: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_k weight[..., k] * rows[index[..., k]] over the last dimension K of index and weight
    (N, Lq, M, P, K): one batched MatMul per head, (N, Lq, M, 1, D)."""
    N, Lq, M, P, K = index.shape
    D = rows.shape[1]
    sampled = rows[index.reshape(-1)].reshape(N, Lq, M, P * K, D)
    return torch.matmul(weight.reshape(N, Lq, M, 1, P * K), sampled)


def _bilinear_level(
    rows: torch.Tensor,
    locations: torch.Tensor,
    weights: torch.Tensor,
    shape: torch.Tensor,
    start: torch.Tensor,
    layout: _Layout,
) -> torch.Tensor:
    """One level's bilinear samples: locations (N, Lq, M, P, 2), weights (N, Lq, M, P),
    shape (H, W) and start as int64 tensors; the weighted sum (N, Lq, M, 1, D)."""
    h_int, w_int = shape[0], shape[1]
    h, w = h_int.to(layout.compute), w_int.to(layout.compute)
    # pixel coordinates, grid_sample's align_corners=False convention
    x = locations[..., 0] * w - 0.5  # (N, Lq, M, P)
    y = locations[..., 1] * h - 0.5
    # NaN fails every comparison, so non-finite and far locations are all "outside"
    inside = (x > -1) & (x < w) & (y > -1) & (y < h)
    x = torch.where(inside, x, torch.zeros_like(x))  # keeps floor/int casts finite
    y = torch.where(inside, y, torch.zeros_like(y))
    weight = torch.where(inside, weights, torch.zeros_like(x))
    x0, y0 = x.floor(), y.floor()
    fx, fy = x - x0, y - y0
    gx, gy = 1 - fx, 1 - fy
    # the four corners (x0, y0), (x0+1, y0), (x0, y0+1), (x0+1, y0+1): (N, Lq, M, P, 4)
    cx = torch.stack([x0, x0 + 1, x0, x0 + 1], dim=-1)
    cy = torch.stack([y0, y0, y0 + 1, y0 + 1], dim=-1)
    bilinear = torch.stack([gx * gy, fx * gy, gx * fy, fx * fy], dim=-1)
    in_map = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
    corner_weight = torch.where(in_map, bilinear * weight.unsqueeze(-1), torch.zeros_like(bilinear))
    # corners off the map read row start_l (weight 0) so no index leaves the level
    cx = torch.where(in_map, cx, torch.zeros_like(cx)).to(torch.int64)
    cy = torch.where(in_map, cy, torch.zeros_like(cy)).to(torch.int64)
    index = (layout.batch_row + start + cy * w_int + cx) * layout.M + layout.head  # (N, Lq, M, P, 4)
    return _gather_weighted(rows, index, corner_weight)


def _tensorrt_node(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    domain: str,
) -> torch.Tensor:
    if value.dtype not in TENSORRT_DTYPES:
        raise ValueError(
            f"msda.onnx.tensorrt_plugin: TensorRT's {TENSORRT_OP} takes value in float32 or float16, got "
            f"{value.dtype}; cast the model (or export without tensorrt_plugin() for the decomposed form)"
        )
    # One dtype for the three float inputs: float32 when any of them is (AMP's
    # fp16 value with fp32 locations), so no input loses precision.
    dtypes = (value.dtype, sampling_locations.dtype, attention_weights.dtype)
    dtype = torch.float32 if torch.float32 in dtypes else torch.float16
    N, _, M, D = value.shape
    Lq = sampling_locations.shape[1]
    inputs = (
        value.to(dtype),
        spatial_shapes.to(torch.int32),
        level_start_index.to(torch.int32),
        sampling_locations.to(dtype),
        attention_weights.to(dtype),
    )
    if torch.jit.is_tracing():
        # The TorchScript exporter cannot translate torch.onnx.ops.symbolic;
        # it takes the node from an autograd.Function's symbolic() instead.
        out = _TensorRTNode.apply(domain, *inputs)
    else:
        out = torch.onnx.ops.symbolic(
            f"{domain}::{TENSORRT_OP}", inputs, {}, dtype=dtype, shape=(N, Lq, M, D), version=1
        )
    return out.reshape(N, Lq, M * D).to(value.dtype)


class _TensorRTNode(torch.autograd.Function):
    """TensorRT's node for the TorchScript exporter (``dynamo=False``)."""

    @staticmethod
    def forward(ctx: Any, domain: str, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):  # type: ignore[override]
        # The traced result is only a placeholder for the node; computing the
        # real one keeps the exporter's own output check meaningful.
        N, _, M, D = value.shape
        out = decomposed_ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        return out.reshape(N, sampling_locations.shape[1], M, D)

    @staticmethod
    def symbolic(g: Any, domain: str, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out = g.op(f"{domain}::{TENSORRT_OP}", value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        # (N, Lq, M, D): N, M, D from value, Lq from the locations, so shape inference has it
        value_type, locations_type = value.type(), sampling_locations.type()
        sizes = [value_type.varyingSizes()[0], locations_type.varyingSizes()[1], *value_type.varyingSizes()[2:]]
        out.setType(value_type.with_sizes(sizes))
        return out


def decompose(program: "torch.export.ExportedProgram") -> "torch.export.ExportedProgram":
    """An ``ExportedProgram`` whose ``torch.ops.msda`` nodes are replaced by the
    decomposition, ready for ``torch.onnx.export(program)``."""
    table = torch.export.default_decompositions()
    table[torch.ops.msda.ms_deform_attn_forward.default] = decomposed_ms_deform_attn
    if hasattr(torch.ops.msda, "ms_deform_attn_v2_forward"):
        from ._onnx_v2 import decomposed_ms_deform_attn_v2

        table[torch.ops.msda.ms_deform_attn_v2_forward.default] = decomposed_ms_deform_attn_v2
    return program.run_decompositions(table)


def translation_table(domain: str = TENSORRT_DOMAIN) -> dict[Callable, Callable]:
    """``custom_translation_table`` that turns ``torch.ops.msda.ms_deform_attn_forward``
    nodes of an ``ExportedProgram`` into TensorRT's node (as :func:`tensorrt_plugin`)::

        program = torch.export.export(model, args)
        torch.onnx.export(program, custom_translation_table=msda.onnx.translation_table())

    For the decomposed form of such a program use :func:`decompose` instead
    (the decomposition exists once, in PyTorch). Needs onnxscript.
    """
    _check_domain(domain)
    onnxscript = _import_optional("onnxscript")
    op = onnxscript.opset18

    _register_tensorrt_schema(domain)
    plugin = getattr(onnxscript.values.Opset(domain, 1), TENSORRT_OP)
    int32, float32 = onnxscript.ir.DataType.INT32, onnxscript.ir.DataType.FLOAT
    allowed = {onnxscript.ir.DataType.FLOAT, onnxscript.ir.DataType.FLOAT16}

    def ms_deform_attn_tensorrt(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        dtypes = [value.dtype, sampling_locations.dtype, attention_weights.dtype]
        if value.dtype not in allowed:
            raise ValueError(
                f"msda.onnx.translation_table: TensorRT's {TENSORRT_OP} takes value in float32 or float16, "
                f"got {value.dtype}"
            )
        dtype = float32 if float32 in dtypes else value.dtype
        out = plugin(
            op.Cast(value, to=dtype),
            op.Cast(spatial_shapes, to=int32),
            op.Cast(level_start_index, to=int32),
            op.Cast(sampling_locations, to=dtype),
            op.Cast(attention_weights, to=dtype),
        )
        # (N, Lq, M, D) -> (N, Lq, M*D)
        shape = op.Concat(op.Shape(out, start=0, end=2), op.Constant(value_ints=[-1]), axis=0)
        return op.Cast(op.Reshape(out, shape), to=value.dtype)

    table: dict[Callable, Callable] = {torch.ops.msda.ms_deform_attn_forward.default: ms_deform_attn_tensorrt}
    if hasattr(torch.ops.msda, "ms_deform_attn_v2_forward"):
        # A v2 node in a program has unequal points or the discrete method (the
        # public function sends equal-points default calls to v1's op).
        def ms_deform_attn_v2_tensorrt(value, spatial_shapes, level_start_index, locations, weights, points, method):
            raise ValueError(_tensorrt_v2_error(list(points), method))

        table[torch.ops.msda.ms_deform_attn_v2_forward.default] = ms_deform_attn_v2_tensorrt
    return table


def _register_tensorrt_schema(domain: str) -> None:
    """onnxscript builds nodes from ONNX schemas: declare the plugin's (inputs, types) once per domain."""
    onnx = _import_optional("onnx")

    if onnx.defs.has(TENSORRT_OP, domain):
        return
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        TENSORRT_OP,
        domain,
        1,
        doc="TensorRT's multi-scale deformable attention plugin; output (N, Lq, M, D).",
        inputs=[
            param("value", "T"),
            param("spatial_shapes", "tensor(int32)"),
            param("level_start_index", "tensor(int32)"),
            param("sampling_locations", "T"),
            param("attention_weights", "T"),
        ],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "float32 or float16")],
    )
    onnx.defs.register_schema(schema)


def _addcdiv_symbolic(g: Any, self: Any, tensor1: Any, tensor2: Any, value: float) -> Any:
    # aten::addcdiv(self, t1, t2, value): self + value * t1 / t2, in eager's order
    # ((value * t1) / t2, the multiplication skipped for value = 1), so the
    # exported locations of MSDeformAttn equal eager's bit for bit.
    numerator = tensor1 if value == 1 else g.op("Mul", tensor1, g.op("Constant", value_t=torch.tensor(value)))
    return g.op("Add", self, g.op("Div", numerator, tensor2))


_torchscript_registered = False


def _register_torchscript_symbolics() -> None:
    """The TorchScript exporter (``dynamo=False``) has no translation of
    aten::addcdiv, which MSDeformAttn's location arithmetic uses. Registered on
    the first export that reaches msda's op: the exporter looks symbolics up
    after tracing, so this is in time, and plain ``import msda`` changes nothing."""
    global _torchscript_registered
    if _torchscript_registered:
        return
    from torch.onnx import symbolic_helper

    symbolic = symbolic_helper.parse_args("v", "v", "v", "f")(_addcdiv_symbolic)
    torch.onnx.register_custom_op_symbolic("aten::addcdiv", symbolic, 9)
    _torchscript_registered = True


def _import_optional(name: str) -> Any:
    """onnx and onnxscript are optional dependencies of msda: name the extra that installs them."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"msda.onnx needs the '{name}' package for this: pip install 'msda[onnx]' "
            "(or: pip install onnx onnxscript onnxruntime)"
        ) from error
