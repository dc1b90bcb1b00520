"""MSDeformAttn is a drop-in for the original module: same parameter names,
shapes and initialisation; its forward is the spec's formulas."""

from __future__ import annotations

import math

import pytest
import torch

import msda


def _inputs(N=2, Lq=6, d=32, shapes=((6, 8), (3, 4)), seed=0):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S = int(sizes.sum())
    query = torch.randn(N, Lq, d, generator=g)
    flat = torch.randn(N, S, d, generator=g)
    return query, flat, spatial_shapes, starts


def _randomise(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_state_dict_keys_and_shapes():
    m = msda.MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }
    for name in ("sampling_offsets", "attention_weights", "value_proj", "output_proj"):
        assert isinstance(getattr(m, name), torch.nn.Linear)
    assert m.im2col_step == 64 and (m.d_model, m.n_levels, m.n_heads, m.n_points) == (256, 4, 8, 4)


@pytest.mark.parametrize("M,L,P", [(8, 4, 4), (3, 2, 5), (1, 1, 1)])
def test_initialisation(M, L, P):
    torch.manual_seed(0)
    m = msda.MSDeformAttn(d_model=8 * M, n_levels=L, n_heads=M, n_points=P)
    assert (m.sampling_offsets.weight == 0).all()
    bias = m.sampling_offsets.bias.view(M, L, P, 2)
    for head in range(M):
        t = 2 * math.pi * head / M
        direction = torch.tensor([math.cos(t), math.sin(t)])
        direction = direction / direction.abs().max()
        for level in range(L):
            for point in range(P):
                torch.testing.assert_close(bias[head, level, point], direction * (point + 1))
    assert (m.attention_weights.weight == 0).all() and (m.attention_weights.bias == 0).all()
    assert (m.value_proj.bias == 0).all() and (m.output_proj.bias == 0).all()
    # xavier_uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = math.sqrt(6 / (2 * 8 * M))
    for w in (m.value_proj.weight, m.output_proj.weight):
        assert w.abs().max() <= bound and w.std() > bound / 4


def _spec_forward(m, query, reference_points, flat, shapes, starts, mask=None):
    """Spec §5's formulas, written out with the reference op."""
    N, Lq, _ = query.shape
    M, L, P = m.n_heads, m.n_levels, m.n_points
    value = flat @ m.value_proj.weight.T + m.value_proj.bias
    if mask is not None:
        value = value * (~mask)[..., None]
    value = value.view(N, -1, M, m.d_model // M)
    offsets = (query @ m.sampling_offsets.weight.T + m.sampling_offsets.bias).view(N, Lq, M, L, P, 2)
    logits = (query @ m.attention_weights.weight.T + m.attention_weights.bias).view(N, Lq, M, L * P)
    weights = logits.softmax(-1).view(N, Lq, M, L, P)
    if reference_points.shape[-1] == 2:
        wh = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(query.dtype)  # (W_l, H_l)
        loc = reference_points[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
    else:
        loc = reference_points[:, :, None, :, None, :2] + offsets / P * reference_points[:, :, None, :, None, 2:] * 0.5
    out = msda.ms_deform_attn_reference(value, shapes, starts, loc, weights)
    return out @ m.output_proj.weight.T + m.output_proj.bias


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("with_mask", [False, True])
def test_forward_follows_the_spec_formulas(ref_dim, with_mask):
    m = msda.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).double()
    _randomise(m)
    query, flat, shapes, starts = _inputs()
    query, flat = query.double(), flat.double()
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(2, 6, 2, ref_dim, generator=g, dtype=torch.float64)
    if ref_dim == 4:
        ref[..., 2:] *= 0.5
    mask = None
    if with_mask:
        mask = torch.zeros(2, flat.shape[1], dtype=torch.bool)
        mask[1, 20:] = True
    got = m(query, ref, flat, shapes, starts, mask)
    want = _spec_forward(m, query, ref, flat, shapes, starts, mask)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_padding_mask_removes_padded_values():
    m = msda.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    _randomise(m)
    query, flat, shapes, starts = _inputs(N=1)
    ref = torch.rand(1, 6, 2, 2)
    mask = torch.zeros(1, flat.shape[1], dtype=torch.bool)
    mask[0, ::3] = True
    changed = flat.clone()
    changed[mask] = 1000.0  # what sits under the mask must not matter
    torch.testing.assert_close(m(query, ref, flat, shapes, starts, mask), m(query, ref, changed, shapes, starts, mask))


def test_original_state_dict_loads_unchanged():
    # A state_dict as the original module writes it: the same keys, shapes, dtypes.
    original = {
        "sampling_offsets.weight": torch.randn(256, 256),
        "sampling_offsets.bias": torch.randn(256),
        "attention_weights.weight": torch.randn(128, 256),
        "attention_weights.bias": torch.randn(128),
        "value_proj.weight": torch.randn(256, 256),
        "value_proj.bias": torch.randn(256),
        "output_proj.weight": torch.randn(256, 256),
        "output_proj.bias": torch.randn(256),
    }
    m = msda.MSDeformAttn()
    result = m.load_state_dict(original, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in m.state_dict().items():
        assert torch.equal(v, original[k])


def test_module_gradients_match_the_reference_path():
    m = msda.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3).double()
    _randomise(m, seed=3)
    query, flat, shapes, starts = _inputs(seed=3)
    query, flat = query.double().requires_grad_(), flat.double().requires_grad_()
    ref = torch.rand(2, 6, 2, 4, dtype=torch.float64) * 0.8 + 0.1
    m(query, ref, flat, shapes, starts).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()] + [query.grad.clone(), flat.grad.clone()]
    m.zero_grad()
    query.grad = flat.grad = None
    _spec_forward(m, query, ref, flat, shapes, starts).sum().backward()
    for got, want in zip(grads, [p.grad for p in m.parameters()] + [query.grad, flat.grad]):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_autocast_style_mixed_precision_inputs():
    # fp16 values with fp32 reference points give fp32 locations: accepted.
    m = msda.MSDeformAttn(d_model=32, n_levels=2, n_heads=4, n_points=3)
    _randomise(m)
    query, flat, shapes, starts = _inputs()
    value = flat.half().view(2, -1, 4, 8)
    loc = torch.rand(2, 6, 4, 2, 3, 2)
    attn = torch.rand(2, 6, 4, 2, 3)
    out = msda.ms_deform_attn(value, shapes, starts, loc, attn)
    assert out.dtype == torch.float16
    want = msda.ms_deform_attn_reference(value.double(), shapes, starts, loc.double(), attn.double())
    torch.testing.assert_close(out.double(), want, rtol=2e-3, atol=2e-3)
