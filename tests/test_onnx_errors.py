"""What torch.onnx.export cannot express fails with msda's message, with both exporters.

* Gradients through msda's op inside the exported code (torch.autograd.grad, double
  backward): the exporters alone fail with their internals (TorchScript: "aten::select_backward
  ... not supported"; dynamo: "We found a fake tensor in the exported program constant's list").
* TensorRT's node with a dtype its plugin lacks (float64, bfloat16): msda's message also from
  the dynamo exporter, whose strict retry used to end in "No ONNX function found for msda...".
* The decomposed form has no dtype to refuse: onnxruntime runs it in float64 and bfloat16 too
  (checked here against eager).
"""

from __future__ import annotations

import pytest
import torch

import msda
import msda.onnx
from cases import make_case
from cases_v2 import make_case_v2
from test_onnx_export import EXPORT_SHAPES, OP_INPUTS, export_file, trained_module, module_inputs

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

M, D, P = 2, 5, 3
EXPORTERS = pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])


class GradientOf(torch.nn.Module):
    """Returns d(sum of the op's output)/d(value): a backward through the op in the exported code."""

    def __init__(self, v2: bool, create_graph: bool) -> None:
        super().__init__()
        self.v2, self.create_graph = v2, create_graph

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        with torch.enable_grad():
            value = value.detach().requires_grad_()
            if self.v2:
                out = msda.ms_deform_attn_v2(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights, [2, 4], "discrete")
            else:
                out = msda.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights)
            (grad,) = torch.autograd.grad(out.square().sum(), value, create_graph=self.create_graph)
        return grad


def export_error(model: torch.nn.Module, args, tmp_path, dynamo: bool) -> str:
    with pytest.raises(Exception) as info:
        export_file(model, args, str(tmp_path / "bad.onnx"), OP_INPUTS, {}, dynamo)
    return str(info.value)


@EXPORTERS
@pytest.mark.parametrize("v2,create_graph", [(False, False), (False, True), (True, True)],
                         ids=["v1-grad", "v1-double-backward", "v2-double-backward"])
def test_gradient_through_the_op_is_refused(tmp_path, dynamo, v2, create_graph):
    if v2:
        args = make_case_v2(1, 3, M, D, EXPORT_SHAPES, [2, 4], "discrete", 0, value_dtype=torch.float32).inputs
    else:
        args = make_case(1, 3, M, D, EXPORT_SHAPES, P, 0, value_dtype=torch.float32).inputs
    message = export_error(GradientOf(v2, create_graph), args, tmp_path, dynamo)
    assert msda.onnx.GRADIENT_ERROR in message, message


@EXPORTERS
def test_module_with_parameters_still_exports_in_train_mode(tmp_path, dynamo):
    # the refusal reacts to a gradient arriving, not to requires_grad (parameters always have it)
    module = trained_module().train()
    path = str(tmp_path / "m.onnx")
    export_file(module, module_inputs(1, 3, EXPORT_SHAPES, False, 0), path, [], {}, dynamo)
    onnx.checker.check_model(onnx.load(path))


class Op(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return msda.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@EXPORTERS
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tensorrt_dtype_refusal_with_both_exporters(tmp_path, dynamo, dtype):
    case = make_case(1, 3, M, D, EXPORT_SHAPES, P, 0, value_dtype=dtype, loc_dtype=torch.float32,
                     attn_dtype=torch.float32)
    with msda.onnx.tensorrt_plugin():
        message = export_error(Op(), case.inputs, tmp_path, dynamo)
    assert msda.onnx.TENSORRT_OP in message and "float32 or float16" in message and str(dtype) in message, message
    assert "No ONNX function found" not in message


class AsFloat32(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return self.inner(value, spatial_shapes, level_start_index, sampling_locations, attention_weights).float()


def ort_value(t: torch.Tensor) -> "ort.OrtValue":
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hand onnxruntime the bits
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.int16).numpy(), onnx.TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


@EXPORTERS
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("v2", [False, True], ids=["v1", "v2-unequal"])
def test_decomposed_form_runs_float64_and_bfloat16(tmp_path, dynamo, dtype, v2):
    if v2:
        case = make_case_v2(2, 5, M, D, EXPORT_SHAPES, [3, 1], "default", 1, value_dtype=dtype)
        model = OpV2()
    else:
        case = make_case(2, 5, M, D, EXPORT_SHAPES, P, 1, value_dtype=dtype)
        model = Op()
    if dtype == torch.bfloat16:
        model = AsFloat32(model)  # onnxruntime's Python API cannot hand a bfloat16 output to numpy
    path = str(tmp_path / "m.onnx")
    export_file(model, case.inputs, path, OP_INPUTS, {}, dynamo)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert {i.type for i in session.get_inputs()} >= {"tensor(bfloat16)" if dtype == torch.bfloat16 else "tensor(double)"}
    feeds = {i.name: ort_value(t) for i, t in zip(session.get_inputs(), case.inputs)}
    (out,) = session.run_with_ort_values(None, feeds)
    got, want = torch.from_numpy(out.numpy()), model(*case.inputs)
    # bfloat16: computed in float32 and rounded once to bfloat16, as eager
    torch.testing.assert_close(got, want, atol=1e-10 if dtype == torch.float64 else 0, rtol=0)


class OpV2(torch.nn.Module):
    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return msda.ms_deform_attn_v2(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights, [3, 1], "default")


