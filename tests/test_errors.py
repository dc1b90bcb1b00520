"""Every bad input of spec §4 raises an error that names the argument, what
was expected and what was given - through the public function, through the
registered op (C++ checks) and through the fake kernel (torch.compile)."""

from __future__ import annotations

import re

import pytest
import torch

import msda
from cases import make_case


def good():
    case = make_case(N=2, Lq=5, M=3, D=4, shapes=[(4, 3), (2, 2)], P=2, seed=0, value_dtype=torch.float32)
    return dict(
        value=case.value,
        spatial_shapes=case.spatial_shapes,
        level_start_index=case.level_start_index,
        sampling_locations=case.sampling_locations,
        attention_weights=case.attention_weights,
    )


def modified(**changes):
    args = good()
    for name, fn in changes.items():
        args[name] = fn(args[name])
    return args


BAD_INPUTS = {
    "value rank": (
        modified(value=lambda v: v[0]),
        "value must have shape (N, S, M, D) (4 dimensions), got (16, 3, 4)",
    ),
    "value integer dtype": (
        modified(value=lambda v: v.to(torch.int64)),
        "value must have dtype float64, float32, bfloat16 or float16, got torch.int64",
    ),
    "value complex dtype": (
        modified(value=lambda v: v.to(torch.complex64)),
        "value must have dtype float64, float32, bfloat16 or float16, got torch.complex64",
    ),
    "spatial_shapes float": (
        modified(spatial_shapes=lambda s: s.float()),
        "spatial_shapes must have dtype int32 or int64, got torch.float32",
    ),
    "spatial_shapes rank": (
        modified(spatial_shapes=lambda s: s.flatten()),
        "spatial_shapes must have shape (L, 2), got (4,)",
    ),
    "level_start_index length": (
        modified(level_start_index=lambda s: s[:1]),
        "level_start_index must have shape (L,) = (2,), got (1,)",
    ),
    "level_start_index float": (
        modified(level_start_index=lambda s: s.double()),
        "level_start_index must have dtype int32 or int64, got torch.float64",
    ),
    "locations rank": (
        modified(sampling_locations=lambda t: t[..., 0]),
        "sampling_locations must have shape (N, Lq, M, L, P, 2) (6 dimensions), got (2, 5, 3, 2, 2)",
    ),
    "locations last dim": (
        modified(sampling_locations=lambda t: torch.cat([t, t[..., :1]], -1)),
        "sampling_locations must have shape (N, Lq, M, L, P, 2) = (2, 5, 3, 2, 2, 2), got (2, 5, 3, 2, 2, 3)",
    ),
    "locations N": (
        modified(sampling_locations=lambda t: t[:1]),
        "sampling_locations must have shape (N, Lq, M, L, P, 2) = (2, 5, 3, 2, 2, 2), got (1, 5, 3, 2, 2, 2)",
    ),
    "locations M": (
        modified(sampling_locations=lambda t: t[:, :, :2]),
        "sampling_locations must have shape (N, Lq, M, L, P, 2) = (2, 5, 3, 2, 2, 2), got (2, 5, 2, 2, 2, 2)",
    ),
    "locations L": (
        modified(sampling_locations=lambda t: t[:, :, :, :1]),
        "sampling_locations must have shape (N, Lq, M, L, P, 2) = (2, 5, 3, 2, 2, 2), got (2, 5, 3, 1, 2, 2)",
    ),
    "weights P": (
        modified(attention_weights=lambda t: t[..., :1]),
        "attention_weights must have shape (N, Lq, M, L, P) = (2, 5, 3, 2, 2), got (2, 5, 3, 2, 1)",
    ),
    "weights Lq": (
        modified(attention_weights=lambda t: t[:, :4]),
        "attention_weights must have shape (N, Lq, M, L, P) = (2, 5, 3, 2, 2), got (2, 4, 3, 2, 2)",
    ),
    "locations dtype": (
        modified(sampling_locations=lambda t: t.double()),
        "sampling_locations must have the dtype of value (torch.float32) or torch.float32, got torch.float64",
    ),
    "weights dtype": (
        modified(attention_weights=lambda t: t.half()),
        "attention_weights must have the dtype of value (torch.float32) or torch.float32, got torch.float16",
    ),
    "weights on meta device": (
        modified(attention_weights=lambda t: t.to("meta")),
        "attention_weights must be on the device of value (cpu), got meta",
    ),
}

# The C++ checks print dtypes the ATen way ("Float" rather than torch.float32).
CPP_DTYPE_NAMES = {"torch.int64": "Long", "torch.float32": "Float", "torch.float64": "Double",
                   "torch.float16": "Half", "torch.complex64": "ComplexFloat"}


def _cpp_message(message: str) -> str:
    message = message.replace(") or torch.float32, got", ") or float32, got")
    for python_name, cpp_name in CPP_DTYPE_NAMES.items():
        message = message.replace(f"(value ({python_name})", f"(value ({cpp_name})")
        message = message.replace(f"got {python_name}", f"got {cpp_name}")
        message = message.replace(f"dtype of value ({python_name})", f"dtype of value ({cpp_name})")
    return message


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_public_function_message(name):
    args, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        msda.ms_deform_attn(**args)


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_reference_message(name):
    args, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=re.escape(message)):
        msda.ms_deform_attn_reference(**args)


@pytest.mark.parametrize("name", [n for n in BAD_INPUTS if "meta" not in n])
def test_registered_op_message(name):
    # Callers of torch.ops.msda.* get the C++ checks, with the same wording.
    args, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=re.escape(_cpp_message(message))):
        torch.ops.msda.ms_deform_attn_forward(*args.values())


@pytest.mark.parametrize("name", [n for n in BAD_INPUTS if "meta" not in n])
def test_registered_backward_op_message(name):
    args, message = BAD_INPUTS[name]
    grad_output = torch.zeros(2, 5, 12)
    with pytest.raises(ValueError, match=re.escape(_cpp_message(message))):
        torch.ops.msda.ms_deform_attn_backward(*args.values(), grad_output)


def test_backward_op_checks_grad_output():
    with pytest.raises(ValueError, match=re.escape("grad_output must have shape (N, Lq, M*D) = (2, 5, 12), got (2, 5, 11)")):
        torch.ops.msda.ms_deform_attn_backward(*good().values(), torch.zeros(2, 5, 11))


def test_fake_kernel_checks_shapes():
    args, message = BAD_INPUTS["locations last dim"]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) for k, v in args.items()}
        with pytest.raises(ValueError, match=re.escape(message)):
            torch.ops.msda.ms_deform_attn_forward(*fake.values())


def test_non_tensor_argument():
    args = good()
    args["value"] = args["value"].tolist()
    with pytest.raises(TypeError, match="value must be a torch.Tensor, got list"):
        msda.ms_deform_attn(**args)


def test_module_rejects_bad_reference_points():
    attn = msda.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    args = good()
    query = torch.zeros(2, 5, 16)
    inp = torch.zeros(2, 16, 16)
    with pytest.raises(ValueError, match=re.escape("reference_points must have last dimension 2 (points) or 4 (boxes), got shape (2, 5, 2, 3)")):
        attn(query, torch.zeros(2, 5, 2, 3), inp, args["spatial_shapes"], args["level_start_index"])


def test_module_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads, got d_model=10 and n_heads=3"):
        msda.MSDeformAttn(d_model=10, n_heads=3)


def test_backward_op_rejects_grad_output_on_another_device():
    # The Meta dispatch key outranks CPU, so a meta grad_output sends CPU
    # inputs to the fake kernel: it must raise, not return uninitialised CPU tensors.
    args = good()
    with pytest.raises(ValueError, match=re.escape("grad_output must have shape (N, Lq, M*D) = (2, 5, 12), got (5, 5)")):
        torch.ops.msda.ms_deform_attn_backward(*args.values(), torch.empty(5, 5, device="meta"))
    with pytest.raises(ValueError, match=re.escape("grad_output must be on the device of value (cpu), got meta")):
        torch.ops.msda.ms_deform_attn_backward(*args.values(), torch.empty(2, 5, 12, device="meta"))


@pytest.mark.parametrize(
    "grad_output,message",
    [
        (torch.zeros(2, 5, 11), "grad_output must have shape (N, Lq, M*D) = (2, 5, 12), got (2, 5, 11)"),
        (torch.zeros(2, 5, 12, dtype=torch.int64), "grad_output must be a floating-point tensor, got torch.int64"),
    ],
)
def test_fake_backward_kernel_checks_grad_output(grad_output, message):
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = good()
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(v) for v in args.values()]
        with pytest.raises(ValueError, match=re.escape(message)):
            torch.ops.msda.ms_deform_attn_backward(*fake, mode.from_tensor(grad_output))


def test_public_function_on_meta_tensors_uses_the_fake_kernel():
    args = {k: v.to("meta").requires_grad_(v.is_floating_point()) for k, v in good().items()}
    out = msda.ms_deform_attn(**args)
    assert out.device.type == "meta" and out.shape == (2, 5, 12) and out.dtype == torch.float32
    out.sum().backward()
    for name in ("value", "sampling_locations", "attention_weights"):
        assert args[name].grad.shape == args[name].shape and args[name].grad.device.type == "meta"
    # with the level tables on the CPU, as a CUDA value accepts them
    args = {k: (v.to("meta") if v.is_floating_point() else v) for k, v in good().items()}
    assert msda.ms_deform_attn(**args).shape == (2, 5, 12)


def _module_args():
    attn = msda.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    args = good()
    return attn, dict(
        query=torch.zeros(2, 5, 16),
        reference_points=torch.rand(2, 5, 2, 2),
        input_flatten=torch.zeros(2, 16, 16),
        input_spatial_shapes=args["spatial_shapes"],
        input_level_start_index=args["level_start_index"],
    )


MODULE_BAD_INPUTS = {
    "shapes (L,)": ("input_spatial_shapes", lambda s: s[:, 0],
                    "input_spatial_shapes must have shape (n_levels, 2) = (2, 2), got (2,)"),
    "shapes (L, 3)": ("input_spatial_shapes", lambda s: torch.cat([s, s[:, :1]], 1),
                      "input_spatial_shapes must have shape (n_levels, 2) = (2, 2), got (2, 3)"),
    "shapes L wrong": ("input_spatial_shapes", lambda s: s[:1],
                       "input_spatial_shapes must have shape (n_levels, 2) = (2, 2), got (1, 2)"),
    "shapes float": ("input_spatial_shapes", lambda s: s.float(),
                     "input_spatial_shapes must have dtype int32 or int64, got torch.float32"),
    "shapes None": ("input_spatial_shapes", lambda s: None, "input_spatial_shapes must be a torch.Tensor, got NoneType"),
    "starts (L, 1)": ("input_level_start_index", lambda s: s[:, None],
                      "input_level_start_index must have shape (n_levels,) = (2,), got (2, 1)"),
    "query d_model": ("query", lambda q: q[..., :8], "query must have shape (N, Lq, d_model=16), got (2, 5, 8)"),
    "query rank": ("query", lambda q: q[0], "query must have shape (N, Lq, d_model=16), got (5, 16)"),
    "flatten N": ("input_flatten", lambda x: x[:1], "input_flatten must have shape (N=2, S, d_model=16), got (1, 16, 16)"),
    "reference levels": ("reference_points", lambda r: r[:, :, :1],
                         "reference_points must have shape (N, Lq, n_levels, 2 or 4) = (2, 5, 2, 2 or 4), got (2, 5, 1, 2)"),
}


@pytest.mark.parametrize("name", MODULE_BAD_INPUTS)
def test_module_validates_arguments_before_indexing_them(name):
    attn, args = _module_args()
    arg, change, message = MODULE_BAD_INPUTS[name]
    args[arg] = change(args[arg])
    error = TypeError if "None" in name else ValueError
    with pytest.raises(error, match=re.escape(message)):
        attn(**args)


def test_module_checks_the_padding_mask():
    attn, args = _module_args()
    with pytest.raises(ValueError, match=re.escape("input_padding_mask must have shape (N, S) = (2, 16), got (2, 15)")):
        attn(**args, input_padding_mask=torch.zeros(2, 15, dtype=torch.bool))
    assert attn(**args, input_padding_mask=torch.zeros(2, 16, dtype=torch.bool)).shape == (2, 5, 16)
