"""The v2 op's registration is complete: torch.library.opcheck on both ops,
torch.compile(fullgraph=True) forward and backward with no graph break
(calling the kernel, not the reference), and torch.export."""

from __future__ import annotations

import pytest
import torch

import msda
from cases_v2 import make_case_v2

METHODS = ["default", "discrete"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_forward(method, dtype):
    case = make_case_v2(2, 4, 2, 3, [(3, 4), (2, 2)], [3, 1], method, seed=0, value_dtype=dtype)
    args = (case.value.requires_grad_(), case.spatial_shapes, case.level_start_index,
            case.sampling_locations.requires_grad_(), case.attention_weights.requires_grad_(), case.points, method)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_v2_forward.default, args)


@pytest.mark.parametrize("method", METHODS)
def test_opcheck_mixed_precision_and_backward(method):
    case = make_case_v2(1, 3, 2, 4, [(3, 3), (1, 2)], [2, 3], method, seed=1, value_dtype=torch.float16,
                        loc_dtype=torch.float32, attn_dtype=torch.float32)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_v2_forward.default, case.args)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_v2_backward.default, (*case.args, case.grad_output))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("points", [[3, 6, 3], [4, 4, 4]])
def test_torch_compile_fullgraph(method, points):
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    case = make_case_v2(1, 5, 2, 4, [(4, 4), (2, 3), (1, 2)], points, method, seed=2, value_dtype=torch.float32)

    def forward(value, loc, attn):
        return msda.ms_deform_attn_v2(value, case.spatial_shapes, case.level_start_index, loc, attn, points, method)

    def step(fn, leaves):
        out = fn(*leaves)
        out.square().sum().backward()  # through the compiled graph's backward
        return out

    leaves = [t.detach().clone().requires_grad_() for t in (case.value, case.sampling_locations, case.attention_weights)]
    eager = step(forward, leaves)
    eager_grads = [t.grad for t in leaves]
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    compiled = step(torch.compile(forward, backend=counter, fullgraph=True), leaves)
    torch.testing.assert_close(compiled, eager)
    for t, want in zip(leaves, eager_grads):
        torch.testing.assert_close(t.grad, want)
    assert counter.frame_count == 1
    graph_ops = [str(node.target) for gm in counter.graphs for node in gm.graph.nodes]
    uniform_default = method == "default" and len(set(points)) == 1
    want_op = "msda.ms_deform_attn_forward" if uniform_default else "msda.ms_deform_attn_v2_forward"
    assert any(want_op in op for op in graph_ops), graph_ops


class V2Layer(torch.nn.Module):
    def __init__(self, points, method):
        super().__init__()
        self.points, self.method = points, method

    def forward(self, value, spatial_shapes, level_start_index, loc, attn):
        return msda.ms_deform_attn_v2(value, spatial_shapes, level_start_index, loc, attn, self.points, self.method)


@pytest.mark.parametrize("method", METHODS)
def test_torch_export(method):
    case = make_case_v2(2, 6, 2, 4, [(4, 5), (2, 2), (1, 1)], [3, 6, 3], method, seed=3, value_dtype=torch.float32)
    layer = V2Layer(case.points, method)
    exported = torch.export.export(layer, case.inputs)
    torch.testing.assert_close(exported.module()(*case.inputs), layer(*case.inputs))
    assert "ms_deform_attn_v2_forward" in str(exported.graph)
