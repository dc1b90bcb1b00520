"""The registration is complete: torch.library.opcheck on both ops, and
torch.compile(fullgraph=True) over MSDeformAttn forward and backward with no
graph break, close to eager."""

from __future__ import annotations

import pytest
import torch

import msda
from cases import make_case


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck_forward(dtype):
    case = make_case(N=2, Lq=4, M=2, D=3, shapes=[(3, 4), (2, 2)], P=2, seed=0, value_dtype=dtype)
    args = (case.value.requires_grad_(), case.spatial_shapes, case.level_start_index,
            case.sampling_locations.requires_grad_(), case.attention_weights.requires_grad_())
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_forward.default, args)


def test_opcheck_forward_mixed_precision():
    case = make_case(N=1, Lq=3, M=2, D=4, shapes=[(3, 3)], P=2, seed=1, value_dtype=torch.float16,
                     loc_dtype=torch.float32, attn_dtype=torch.float32)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_forward.default, case.inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_opcheck_backward(dtype):
    case = make_case(N=2, Lq=4, M=2, D=3, shapes=[(3, 4), (2, 2)], P=2, seed=0, value_dtype=dtype)
    torch.library.opcheck(torch.ops.msda.ms_deform_attn_backward.default, (*case.inputs, case.grad_output))


def _module_inputs(seed=0):
    torch.manual_seed(seed)
    shapes = torch.tensor([[8, 10], [4, 5], [2, 3]])
    starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    query = torch.randn(2, 7, 32)
    reference = torch.rand(2, 7, 3, 2)
    flat = torch.randn(2, S, 32)
    mask = torch.zeros(2, S, dtype=torch.bool)
    mask[1, -10:] = True
    return query, reference, flat, shapes, starts, mask


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    module = msda.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    with torch.no_grad():  # non-trivial offsets and weights
        module.sampling_offsets.weight.normal_(0, 0.05)
        module.attention_weights.weight.normal_(0, 0.1)
    inputs = _module_inputs()

    def step(m, *args):
        out = m(*args)
        out.square().sum().backward()
        return out

    eager_out = step(module, *inputs)
    eager_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    compiled = torch.compile(module, fullgraph=True)
    compiled_out = step(compiled, *inputs)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-4, atol=1e-5)
    for got, want in zip((p.grad for p in module.parameters()), eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_torch_compile_calls_the_kernel_not_the_reference():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("eager")
    case = make_case(N=1, Lq=3, M=2, D=4, shapes=[(3, 3)], P=2, seed=1, value_dtype=torch.float32)
    fn = torch.compile(msda.ms_deform_attn, backend=counter, fullgraph=True)
    torch.testing.assert_close(fn(*case.inputs), msda.ms_deform_attn(*case.inputs))
    assert counter.frame_count == 1
    graph_ops = [str(node.target) for gm in counter.graphs for node in gm.graph.nodes]
    assert any("msda.ms_deform_attn_forward" in op for op in graph_ops), graph_ops


def test_torch_export():
    module = msda.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2).eval()
    inputs = _module_inputs()
    exported = torch.export.export(module, inputs)
    torch.testing.assert_close(exported.module()(*inputs), module(*inputs))
