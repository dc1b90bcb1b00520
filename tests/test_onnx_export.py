"""ONNX export (msda.onnx): plain torch.onnx.export, both exporters, run in onnxruntime.

Each exported file is checked at the shape it was exported with and at two
others (batch, queries and image sizes all change), against eager msda in
float32 (<= 1e-4 abs), with locations inside and outside the map, non-finite
and huge locations, and NaN/inf weights on outside points. The TensorRT form
is checked by reading the graph and by onnx's checker (no TensorRT here).
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import msda
import msda.onnx
from cases import level_tables, make_case

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

ATOL = 1e-4
OP_INPUTS = ["value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"]
MODULE_INPUTS = ["query", "reference_points", "input_flatten", "input_spatial_shapes", "input_level_start_index", "input_padding_mask"]
M, D, P = 2, 5, 3  # fixed by the exported graph; N, Lq, S and the level sizes are not
EXPORT_SHAPES = [(6, 4), (3, 2)]
# (N, Lq, level sizes): the export shape, then two others, one with 1-pixel sides
RUN_SHAPES = [(2, 7, EXPORT_SHAPES), (3, 11, [(9, 13), (5, 1)]), (1, 2, [(1, 1), (4, 7)])]


class Op(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return msda.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


class Apply(torch.nn.Module):
    """The original calling convention (MSDeformAttnFunction.apply with im2col_step)."""

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return msda.MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, 64)


def op_inputs(N: int, Lq: int, shapes, seed: int = 0) -> tuple[torch.Tensor, ...]:
    case = make_case(N, Lq, M, D, shapes, P, seed, value_dtype=torch.float32, outside_fraction=0.3)
    return case.inputs


def export(model: torch.nn.Module, args, path: str, names: list[str], dynamic: dict[str, dict[int, str]], dynamo: bool) -> ort.InferenceSession:
    """torch.onnx.export exactly as a user would, with the named dimensions dynamic; an onnxruntime session."""
    export_file(model, args, path, names, dynamic, dynamo)
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def export_file(model: torch.nn.Module, args, path: str, names: list[str], dynamic: dict[str, dict[int, str]], dynamo: bool) -> None:
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer warnings
        if dynamo:
            dims = {name: torch.export.Dim(name) for axes in dynamic.values() for name in axes.values()}
            shapes = tuple({axis: dims[name] for axis, name in dynamic.get(n, {}).items()} or None for n in names)
            torch.onnx.export(model, args, path, dynamo=True, input_names=names, dynamic_shapes=shapes)
        else:
            torch.onnx.export(model, args, path, dynamo=False, input_names=names, dynamic_axes=dynamic)


def run(session: ort.InferenceSession, args) -> torch.Tensor:
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return torch.from_numpy(session.run(None, feeds)[0])


OP_DYNAMIC = {
    "value": {0: "N", 1: "S"},
    "sampling_locations": {0: "N", 1: "Lq"},
    "attention_weights": {0: "N", 1: "Lq"},
}


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def op_session(request, tmp_path_factory) -> ort.InferenceSession:
    path = str(tmp_path_factory.mktemp("onnx") / f"op_{request.param}.onnx")
    args = op_inputs(*RUN_SHAPES[0][:2], RUN_SHAPES[0][2])
    return export(Op(), args, path, OP_INPUTS, OP_DYNAMIC, dynamo=request.param == "dynamo")


@pytest.mark.parametrize("N,Lq,shapes", RUN_SHAPES)
def test_op_matches_eager_at_export_and_other_shapes(op_session, N, Lq, shapes):
    args = op_inputs(N, Lq, shapes, seed=N + Lq)
    got = run(op_session, args)
    want = msda.ms_deform_attn(*args)
    assert got.shape == want.shape == (N, Lq, M * D)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
def test_op_nonfinite_and_far_locations_contribute_zero(op_session, bad):
    value, shapes, starts, locations, weights = op_inputs(3, 11, [(9, 13), (5, 1)], seed=3)
    locations, weights = locations.clone(), weights.clone()
    # one bad coordinate (x or y) per sample on a stripe of samples, with a NaN, inf or huge weight
    hit = torch.zeros(weights.shape, dtype=torch.bool)
    hit[:, ::2, :, :, 0] = True
    hit[1, :, 1, 1, :] = True
    even = torch.arange(P) % 2 == 0
    locations[..., 0] = torch.where(hit & even, bad, locations[..., 0])
    locations[..., 1] = torch.where(hit & ~even, bad, locations[..., 1])
    bad_weights = torch.tensor([float("nan"), float("inf"), 1e30])
    weights[hit] = bad_weights[torch.arange(int(hit.sum())) % 3]
    got = run(op_session, (value, shapes, starts, locations, weights))
    assert torch.isfinite(got).all()
    # the rule itself, independently of msda's kernels: those samples contribute nothing
    want = msda.ms_deform_attn(value, shapes, starts, locations.masked_fill(hit[..., None], 0.5), weights.masked_fill(hit, 0.0))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got, msda.ms_deform_attn(value, shapes, starts, locations, weights), atol=ATOL, rtol=0)


def test_op_samples_just_outside_the_window(op_session):
    # x = loc * W - 0.5 on either side of -1 and W: outside samples (with NaN weights) give nothing,
    # inside ones near the border read one column
    value, shapes, starts, locations, weights = op_inputs(1, 4, EXPORT_SHAPES, seed=5)
    W = EXPORT_SHAPES[0][1]
    # x = -1 - e, -1 + e, W - e, W + e
    xs = torch.tensor([-0.5 - 1e-3, -0.5 + 1e-3, W + 0.5 - 1e-3, W + 0.5 + 1e-3]) / W
    locations = locations.clone()
    locations[0, :, :, 0, :, 0] = xs.view(4, 1, 1)
    locations[0, :, :, 0, :, 1] = 0.5
    outside = torch.zeros(weights.shape, dtype=torch.bool)
    outside[0, [0, 3], :, 0, :] = True
    weights = weights.masked_fill(outside, float("nan"))
    got = run(op_session, (value, shapes, starts, locations, weights))
    want = msda.ms_deform_attn(value, shapes, starts, locations, weights.masked_fill(outside, 0.0))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_function_apply_exports(tmp_path):
    args = op_inputs(*RUN_SHAPES[0][:2], RUN_SHAPES[0][2])
    session = export(Apply(), args, str(tmp_path / "apply.onnx"), OP_INPUTS, OP_DYNAMIC, dynamo=False)
    other = op_inputs(*RUN_SHAPES[1][:2], RUN_SHAPES[1][2], seed=1)
    torch.testing.assert_close(run(session, other), msda.ms_deform_attn(*other), atol=ATOL, rtol=0)


def test_float64_value_exports_and_runs(tmp_path):
    case = make_case(2, 5, M, D, EXPORT_SHAPES, P, 7, value_dtype=torch.float64)
    session = export(Op(), case.inputs, str(tmp_path / "f64.onnx"), OP_INPUTS, OP_DYNAMIC, dynamo=False)
    torch.testing.assert_close(run(session, case.inputs), msda.ms_deform_attn(*case.inputs), atol=1e-10, rtol=0)


def test_float16_value_with_float32_locations(tmp_path):
    # AMP's mix: computed in float32 in the graph, returned in float16 like the op
    case = make_case(2, 5, M, D, EXPORT_SHAPES, P, 8, value_dtype=torch.float16, loc_dtype=torch.float32, attn_dtype=torch.float32)
    session = export(Op(), case.inputs, str(tmp_path / "f16.onnx"), OP_INPUTS, OP_DYNAMIC, dynamo=False)
    got = run(session, case.inputs)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), msda.ms_deform_attn(*case.inputs).float(), atol=2e-3, rtol=2e-3)


# ---- the module ------------------------------------------------------------------------------

MODULE_DYNAMIC = {
    "query": {0: "N", 1: "Lq"},
    "reference_points": {0: "N", 1: "Lq"},
    "input_flatten": {0: "N", 1: "S"},
    "input_padding_mask": {0: "N", 1: "S"},
}


def module_inputs(N: int, Lq: int, shapes, box: bool, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, starts = level_tables(shapes)
    S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    reference = torch.rand(N, Lq, len(shapes), 4 if box else 2, generator=gen) * 1.2 - 0.1
    return (
        torch.randn(N, Lq, 16, generator=gen),
        reference,
        torch.randn(N, S, 16, generator=gen),
        spatial_shapes,
        starts,
        torch.rand(N, S, generator=gen) < 0.2,
    )


def trained_module() -> msda.MSDeformAttn:
    torch.manual_seed(0)
    module = msda.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=3).eval()
    with torch.no_grad():  # offsets large enough to leave the map, weights not uniform
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return module


@pytest.mark.parametrize("dynamo,box", [(True, False), (False, False), (False, True)], ids=["dynamo-points", "torchscript-points", "torchscript-boxes"])
def test_module_matches_eager(tmp_path, dynamo, box):
    module = trained_module()
    session = export(module, module_inputs(2, 7, EXPORT_SHAPES, box, 0), str(tmp_path / "m.onnx"), MODULE_INPUTS, MODULE_DYNAMIC, dynamo)
    for seed, (N, Lq, shapes) in enumerate(RUN_SHAPES):
        args = module_inputs(N, Lq, shapes, box, seed)
        with torch.no_grad():
            want = module(*args)
        torch.testing.assert_close(run(session, args), want, atol=ATOL, rtol=0)


def test_torchscript_exporter_translates_addcdiv():
    # MSDeformAttn's point locations use addcdiv, which the TorchScript exporter lacks: msda.onnx
    # registers it; the exported node sequence is Div then Add (eager's order, same bits)
    module = trained_module()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, module_inputs(1, 3, EXPORT_SHAPES, False, 0), buffer, dynamo=False)
    ops = [n.op_type for n in onnx.load_from_string(buffer.getvalue()).graph.node]
    assert "ATen" not in ops
    assert any(a == "Div" and b == "Add" for a, b in zip(ops, ops[1:]))


# ---- TensorRT's node ---------------------------------------------------------------------------


def node_of(model: "onnx.ModelProto", op_type: str) -> "onnx.NodeProto":
    nodes = [n for n in model.graph.node if n.op_type == op_type]
    assert len(nodes) == 1, [n.op_type for n in model.graph.node]
    return nodes[0]


def value_infos(model: "onnx.ModelProto") -> dict[str, "onnx.ValueInfoProto"]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    graph = inferred.graph
    return {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}


def dims(info) -> list:
    return [d.dim_param or d.dim_value for d in info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16])
def test_tensorrt_node(tmp_path, dynamo, value_dtype):
    case = make_case(2, 7, M, D, EXPORT_SHAPES, P, 0, value_dtype=value_dtype, loc_dtype=torch.float32, attn_dtype=value_dtype)
    path = str(tmp_path / "trt.onnx")
    with msda.onnx.tensorrt_plugin():
        export_file(Op(), case.inputs, path, OP_INPUTS, OP_DYNAMIC, dynamo)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    node = node_of(model, msda.onnx.TENSORRT_OP)
    assert node.domain == msda.onnx.TENSORRT_DOMAIN and len(node.attribute) == 0
    assert {(o.domain, o.version) for o in model.opset_import} >= {(msda.onnx.TENSORRT_DOMAIN, 1)}
    # nothing of the decomposition is left: the plugin does the whole op (Gathers only read shapes)
    assert not {"Floor", "GatherElements", "GridSample", "MatMul", "Where"} & {n.op_type for n in model.graph.node}
    infos = value_infos(model)
    elem = onnx.TensorProto
    float_type = elem.FLOAT  # the locations are float32, so every float input is cast to float32
    expected_inputs = [(float_type, 4), (elem.INT32, 2), (elem.INT32, 1), (float_type, 6), (float_type, 5)]
    for name, (dtype, rank) in zip(node.input, expected_inputs):
        info = infos[name]
        assert (info.type.tensor_type.elem_type, len(dims(info))) == (dtype, rank), name
    out = dims(infos[node.output[0]])
    assert len(out) == 4 and out[2:] == [M, D]  # (N, Lq, M, D), N and Lq symbolic
    assert all(isinstance(d, str) for d in out[:2])
    graph_out = model.graph.output[0].type.tensor_type
    assert graph_out.elem_type == onnx.helper.np_dtype_to_tensor_dtype(torch.empty(0, dtype=value_dtype).numpy().dtype)
    assert len(graph_out.shape.dim) == 3
    if dynamo:  # the TorchScript exporter names every output dimension, even static ones
        assert graph_out.shape.dim[2].dim_value == M * D


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tensorrt_node_refuses_dtypes_it_cannot_take(tmp_path, dtype):
    case = make_case(1, 3, M, D, EXPORT_SHAPES, P, 0, value_dtype=dtype, loc_dtype=torch.float32, attn_dtype=torch.float32)
    with msda.onnx.tensorrt_plugin(), pytest.raises(Exception) as info:
        export_file(Op(), case.inputs, str(tmp_path / "bad.onnx"), OP_INPUTS, {}, dynamo=False)
    message = str(info.value)
    assert msda.onnx.TENSORRT_OP in message and "float32 or float16" in message and str(dtype) in message


def test_tensorrt_plugin_needs_a_custom_domain():
    with pytest.raises(ValueError, match="custom ONNX domain"):
        with msda.onnx.tensorrt_plugin(domain=""):
            pass


def test_tensorrt_context_is_restored_after_export(tmp_path):
    args = op_inputs(1, 3, EXPORT_SHAPES)
    with msda.onnx.tensorrt_plugin():
        export_file(Op(), args, str(tmp_path / "trt.onnx"), OP_INPUTS, {}, dynamo=False)
    session = export(Op(), args, str(tmp_path / "after.onnx"), OP_INPUTS, {}, dynamo=False)
    torch.testing.assert_close(run(session, args), msda.ms_deform_attn(*args), atol=ATOL, rtol=0)


# ---- a program exported by the user: decompose() and the translation table --------------------


@pytest.fixture(scope="module")
def user_program():
    args = op_inputs(*RUN_SHAPES[0][:2], RUN_SHAPES[0][2])
    dims = {n: torch.export.Dim(n) for n in ("N", "S", "Lq")}
    shapes = tuple({a: dims[d] for a, d in OP_DYNAMIC.get(n, {}).items()} or None for n in OP_INPUTS)
    program = torch.export.export(Op(), args, dynamic_shapes=shapes)
    targets = {n.target for n in program.graph.nodes}
    assert torch.ops.msda.ms_deform_attn_forward.default in targets  # outside torch.onnx.export: the kernel
    return program


def test_decompose_exported_program(tmp_path, user_program):
    path = str(tmp_path / "decomposed.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(msda.onnx.decompose(user_program), (), path, dynamo=True, input_names=OP_INPUTS)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    args = op_inputs(*RUN_SHAPES[1][:2], RUN_SHAPES[1][2], seed=9)
    torch.testing.assert_close(run(session, args), msda.ms_deform_attn(*args), atol=ATOL, rtol=0)


def test_translation_table_gives_tensorrt_node(tmp_path, user_program):
    path = str(tmp_path / "table.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(user_program, (), path, dynamo=True, custom_translation_table=msda.onnx.translation_table())
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    node = node_of(model, msda.onnx.TENSORRT_OP)
    assert node.domain == msda.onnx.TENSORRT_DOMAIN
    assert dims(model.graph.output[0])[2] == M * D


# ---- integration modules ------------------------------------------------------------------------


class MmcvLayer(torch.nn.Module):
    """msda.integrations.mmcv's MultiScaleDeformableAttention (batch_first) with tensor-only inputs."""

    def __init__(self) -> None:
        super().__init__()
        from msda.integrations.mmcv import MultiScaleDeformableAttention

        torch.manual_seed(0)
        self.layer = MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=2, num_points=3, batch_first=True)
        with torch.no_grad():
            for p in self.layer.parameters():
                p.add_(torch.randn_like(p) * 0.5)

    def forward(self, query, value, reference_points, spatial_shapes, level_start_index):
        return self.layer(
            query, value=value, reference_points=reference_points,
            spatial_shapes=spatial_shapes, level_start_index=level_start_index,
        )


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_mmcv_integration_module_exports(tmp_path, dynamo):
    names = ["query", "value", "reference_points", "spatial_shapes", "level_start_index"]
    dynamic = {"query": {0: "N", 1: "Lq"}, "value": {0: "N", 1: "S"}, "reference_points": {0: "N", 1: "Lq"}}

    def inputs(N, Lq, shapes, seed):
        query, reference, flatten, spatial_shapes, starts, _ = module_inputs(N, Lq, shapes, False, seed)
        return query, flatten, reference, spatial_shapes, starts

    layer = MmcvLayer().eval()
    session = export(layer, inputs(2, 7, EXPORT_SHAPES, 0), str(tmp_path / "mmcv.onnx"), names, dynamic, dynamo)
    for seed, (N, Lq, shapes) in enumerate(RUN_SHAPES):
        args = inputs(N, Lq, shapes, seed)
        with torch.no_grad():
            want = layer(*args)
        torch.testing.assert_close(run(session, args), want, atol=ATOL, rtol=0)


class HfFunction(torch.nn.Module):
    """msda.integrations' replacement for transformers' ``multi_scale_deformable_attention``
    (the level start rows are computed from the shapes inside the graph)."""

    def forward(self, value, spatial_shapes, sampling_locations, attention_weights):
        from msda.integrations._hf_forwards import function

        return function(value, spatial_shapes, sampling_locations, attention_weights)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_transformers_integration_function_exports(tmp_path, dynamo):
    names = ["value", "spatial_shapes", "sampling_locations", "attention_weights"]
    dynamic = {k: v for k, v in OP_DYNAMIC.items()}

    def inputs(N, Lq, shapes, seed):
        value, spatial_shapes, _, locations, weights = op_inputs(N, Lq, shapes, seed)
        return value, spatial_shapes, locations, weights

    session = export(HfFunction(), inputs(2, 7, EXPORT_SHAPES, 0), str(tmp_path / "hf.onnx"), names, dynamic, dynamo)
    for seed, (N, Lq, shapes) in enumerate(RUN_SHAPES):
        args = inputs(N, Lq, shapes, seed)
        torch.testing.assert_close(run(session, args), HfFunction()(*args), atol=ATOL, rtol=0)
