"""msda.integrations.mmcv against mmcv-lite 2.2.0's real
``mmcv.ops.multi_scale_deform_attn`` module (its init_weights, forward,
state_dict and pure-PyTorch CPU path).

mmcv-lite ships without the compiled ``mmcv._ext``, which ``mmcv.ops``
imports at load time. The one stand-in here is for that library only: a
module whose functions raise if called. mmcv's CPU path never calls them, so
every mmcv result in these tests is mmcv's own code.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import types
import warnings

import pytest
import torch

pytest.importorskip("mmcv")

import msda.integrations.mmcv as msda_mmcv  # noqa: E402
from msda.integrations import _shared  # noqa: E402


def _ext_stand_in() -> types.ModuleType:
    ext = types.ModuleType("mmcv._ext")

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def not_compiled(*args, **kwargs):
            raise RuntimeError(f"mmcv._ext.{name} is the tests' stand-in for mmcv's compiled library")

        return not_compiled

    ext.__getattr__ = __getattr__
    return ext


@pytest.fixture(scope="module")
def mmcv_msda():
    if importlib.util.find_spec("mmcv._ext") is None and "mmcv._ext" not in sys.modules:
        sys.modules["mmcv._ext"] = _ext_stand_in()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from mmcv.ops import multi_scale_deform_attn
    return multi_scale_deform_attn


@pytest.fixture(autouse=True)
def _unpatched():
    msda_mmcv.unpatch()
    yield
    msda_mmcv.unpatch()


SHAPES = [(9, 11), (5, 6), (3, 3), (1, 2)]


def _inputs(batch_first, coords, bs=2, num_query=7, dims=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_value = sum(h * w for h, w in SHAPES)
    q_shape = (bs, num_query, dims) if batch_first else (num_query, bs, dims)
    v_shape = (bs, num_value, dims) if batch_first else (num_value, bs, dims)
    shapes = torch.tensor(SHAPES)
    areas = shapes[:, 0] * shapes[:, 1]
    mask = torch.zeros(bs, num_value, dtype=torch.bool)
    mask[0, -20:] = True
    return dict(
        query=torch.randn(q_shape, generator=g, dtype=dtype),
        value=torch.randn(v_shape, generator=g, dtype=dtype),
        identity=torch.randn(q_shape, generator=g, dtype=dtype),
        query_pos=torch.randn(q_shape, generator=g, dtype=dtype),
        key_padding_mask=mask,
        reference_points=torch.rand(bs, num_query, len(SHAPES), coords, generator=g, dtype=dtype) * 0.8 + 0.1,
        spatial_shapes=shapes,
        level_start_index=torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]),
    )


def _pair(mmcv_module, seed=0, **kwargs):
    """mmcv's module and msda's, built from the same seed, offsets jittered
    off whole pixels (where the bilinear gradient is one-sided)."""
    torch.manual_seed(seed)
    theirs = mmcv_module.MultiScaleDeformableAttention(**kwargs)
    torch.manual_seed(seed)
    ours = msda_mmcv.MultiScaleDeformableAttention(**kwargs)
    for a, b in zip(theirs.state_dict().values(), ours.state_dict().values()):
        assert torch.equal(a, b)  # same initialisation, bit for bit
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        theirs.sampling_offsets.weight.normal_(0, 0.05, generator=g)
        theirs.sampling_offsets.bias.add_(torch.rand(theirs.sampling_offsets.bias.shape, generator=g) - 0.5)
        theirs.attention_weights.weight.normal_(0, 0.1, generator=g)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


CASES = [
    # (batch_first, coords, value_proj_ratio, use identity / query_pos / key_padding_mask)
    (False, 2, 1.0, ()),
    (False, 2, 1.0, ("identity", "query_pos", "key_padding_mask")),
    (True, 2, 0.5, ("query_pos",)),
    (True, 4, 1.0, ("identity", "key_padding_mask")),
    (False, 4, 0.5, ("identity", "query_pos", "key_padding_mask")),
]


@pytest.mark.parametrize("batch_first, coords, ratio, used", CASES)
def test_module_matches_mmcv(mmcv_msda, batch_first, coords, ratio, used):
    theirs, ours = _pair(mmcv_msda, embed_dims=32, num_heads=4, num_points=3, dropout=0.0,
                         batch_first=batch_first, value_proj_ratio=ratio)
    base = _inputs(batch_first, coords)
    keep = {"query", "value", "reference_points", "spatial_shapes", "level_start_index", *used}
    results = []
    for module in (theirs, ours):
        inputs = {k: v.clone().requires_grad_(v.is_floating_point() and k in ("query", "value"))
                  if isinstance(v, torch.Tensor) else v for k, v in base.items() if k in keep}
        out = module(**inputs)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        (out * weight).sum().backward()
        grads = {n: p.grad for n, p in module.named_parameters()}
        grads.update(query=inputs["query"].grad, value=inputs["value"].grad)
        results.append((out, grads))
    (want, want_grads), (got, got_grads) = results
    assert got.shape == want.shape == base["query"].shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for name in want_grads:
        scale = max(1.0, want_grads[name].abs().max().item())
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5 * scale, rtol=1e-4, msg=name)


@pytest.mark.parametrize("batch_first, coords, ratio, used", [c for c in CASES if "key_padding_mask" in c[3]])
def test_module_matches_mmcv_in_inference(mmcv_msda, batch_first, coords, ratio, used):
    # Without autograd msda's module writes the softmax and the locations into
    # the projections' outputs and adds query_pos into a cached block: the
    # inputs stay as given and the output is mmcv's.
    theirs, ours = _pair(mmcv_msda, embed_dims=32, num_heads=4, num_points=3, dropout=0.0,
                         batch_first=batch_first, value_proj_ratio=ratio)
    base = _inputs(batch_first, coords)
    inputs = {k: v for k, v in base.items() if k in {"query", "value", "reference_points", "spatial_shapes",
                                                      "level_start_index", *used}}
    copies = {k: v.clone() for k, v in inputs.items()}
    with torch.no_grad():
        want, got = theirs(**inputs), ours(**inputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for k, v in inputs.items():
        assert torch.equal(v, copies[k]), k


def test_dropout_and_residual_keyword_match_mmcv(mmcv_msda):
    theirs, ours = _pair(mmcv_msda, embed_dims=32, num_heads=4, dropout=0.5)
    inputs = _inputs(False, 2)
    del inputs["identity"]
    residual = torch.randn(inputs["query"].shape)
    outputs = []
    for module in (theirs, ours):
        module.train()
        torch.manual_seed(7)  # the same dropout mask: nothing before it draws random numbers
        with pytest.warns(DeprecationWarning, match="residual"):
            outputs.append(module(residual=residual, **inputs))
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=0)
    ours.eval()
    assert not torch.equal(ours(identity=residual, **inputs), outputs[1])  # dropout really dropped


def test_state_dict_round_trip(mmcv_msda):
    theirs, ours = _pair(mmcv_msda, embed_dims=64, num_heads=8, num_levels=3, value_proj_ratio=0.5)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    kwargs = dict(embed_dims=64, num_heads=8, num_levels=3, value_proj_ratio=0.5)
    fresh_theirs = mmcv_msda.MultiScaleDeformableAttention(**kwargs)
    fresh_theirs.load_state_dict(ours.state_dict(), strict=True)
    fresh_ours = msda_mmcv.MultiScaleDeformableAttention(**kwargs)
    fresh_ours.load_state_dict(theirs.state_dict(), strict=True)
    for a, b in zip(fresh_theirs.state_dict().values(), fresh_ours.state_dict().values()):
        assert torch.equal(a, b)


def test_constructor_and_forward_signatures_match_mmcv(mmcv_msda):
    theirs = inspect.signature(mmcv_msda.MultiScaleDeformableAttention.__init__).parameters
    ours = inspect.signature(msda_mmcv.MultiScaleDeformableAttention.__init__).parameters
    assert [(p.name, p.default) for p in ours.values()] == [(p.name, p.default) for p in theirs.values()]
    theirs = inspect.signature(mmcv_msda.MultiScaleDeformableAttention.forward).parameters
    ours = inspect.signature(msda_mmcv.MultiScaleDeformableAttention.forward).parameters
    def described(params):
        return [(p.name, p.default, p.kind) for p in params.values()]

    assert described(ours) == described(theirs)
    theirs = list(inspect.signature(mmcv_msda.MultiScaleDeformableAttnFunction.forward).parameters)[1:]  # less ctx
    ours = list(inspect.signature(msda_mmcv.MultiScaleDeformableAttnFunction.apply).parameters)
    assert ours == theirs


def test_function_and_fallback_match_mmcv_pytorch(mmcv_msda):
    g = torch.Generator().manual_seed(3)
    shapes = torch.tensor(SHAPES)
    areas = shapes[:, 0] * shapes[:, 1]
    value = torch.randn(2, int(areas.sum()), 4, 8, generator=g)
    locations = torch.rand(2, 5, 4, len(SHAPES), 3, 2, generator=g) * 1.2 - 0.1
    weights = torch.rand(2, 5, 4, len(SHAPES), 3, generator=g)
    want = mmcv_msda.multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    got = msda_mmcv.MultiScaleDeformableAttnFunction.apply(value, shapes, starts, locations, weights, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    got = msda_mmcv.multi_scale_deformable_attn_pytorch(value, shapes, locations, weights)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_patch_routes_real_mmcv_ops_to_msda(mmcv_msda, monkeypatch):
    from mmcv.ops import MultiScaleDeformableAttention as imported_before  # as mmdet does
    from mmengine.registry import MODELS

    originals = {name: vars(mmcv_msda)[name] for name in ("MultiScaleDeformableAttnFunction",
                                                          "multi_scale_deformable_attn_pytorch")}
    original_forward = vars(mmcv_msda.MultiScaleDeformableAttention)["forward"]
    torch.manual_seed(0)
    direct = imported_before(embed_dims=32, num_heads=4, dropout=0.0)
    built = MODELS.build(dict(type="MultiScaleDeformableAttention", embed_dims=32, num_heads=4, dropout=0.0))
    built.load_state_dict(direct.state_dict())
    _, jittered = _pair(mmcv_msda, embed_dims=32, num_heads=4, dropout=0.0)
    direct.load_state_dict(jittered.state_dict())
    built.load_state_dict(jittered.state_dict())
    inputs = _inputs(False, 2)
    with torch.no_grad():
        want = direct(**inputs)

    calls = []
    real = msda_mmcv.ms_deform_attn
    monkeypatch.setattr(msda_mmcv, "ms_deform_attn", lambda *a: calls.append(1) or real(*a))
    msda_mmcv.patch()
    msda_mmcv.patch()  # twice is harmless
    with torch.no_grad():
        for module in (direct, built):
            calls.clear()
            torch.testing.assert_close(module(**inputs), want, atol=1e-5, rtol=0)
            assert calls == [1]
    assert mmcv_msda.MultiScaleDeformableAttnFunction is msda_mmcv.MultiScaleDeformableAttnFunction
    assert mmcv_msda.multi_scale_deformable_attn_pytorch is msda_mmcv.multi_scale_deformable_attn_pytorch
    # mmcv's own Function class, imported by name before patch(): its apply
    # (mmcv's compiled op, the stand-in here, which raises) now runs msda.
    value = torch.randn(2, sum(h * w for h, w in SHAPES), 4, 8)
    locations, weights = torch.rand(2, 5, 4, len(SHAPES), 3, 2), torch.rand(2, 5, 4, len(SHAPES), 3)
    got = originals["MultiScaleDeformableAttnFunction"].apply(
        value, inputs["spatial_shapes"], inputs["level_start_index"], locations, weights, 64
    )
    expected = originals["multi_scale_deformable_attn_pytorch"](value, inputs["spatial_shapes"], locations, weights)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    msda_mmcv.unpatch()
    for name, original in originals.items():
        assert vars(mmcv_msda)[name] is original
    assert vars(mmcv_msda.MultiScaleDeformableAttention)["forward"] is original_forward
    assert "apply" not in vars(originals["MultiScaleDeformableAttnFunction"])
    with torch.no_grad():
        assert torch.equal(direct(**inputs), want)


def test_patch_also_covers_mmcv_forks_that_keep_their_forward(mmcv_msda, monkeypatch):
    # A forward with another signature is left alone (with a warning); it still
    # looks up the fallback function at call time, and that is msda's.
    cls = mmcv_msda.MultiScaleDeformableAttention
    original = vars(cls)["forward"]

    def forward(self, query, value, reference_points, spatial_shapes, level_start_index):
        return original(self, query, value=value, reference_points=reference_points,
                        spatial_shapes=spatial_shapes, level_start_index=level_start_index)

    monkeypatch.setattr(cls, "forward", forward)
    calls = []
    real = _shared.ms_deform_attn
    monkeypatch.setattr(_shared, "ms_deform_attn", lambda *a: calls.append(1) or real(*a))
    with pytest.warns(UserWarning, match="keeps its own forward"):
        msda_mmcv.patch()
    assert vars(cls)["forward"] is forward
    module = cls(embed_dims=32, num_heads=4, dropout=0.0)
    inputs = _inputs(False, 2)
    with torch.no_grad():
        module(inputs["query"], inputs["value"], inputs["reference_points"], inputs["spatial_shapes"],
               inputs["level_start_index"])
    assert calls == [1]
    msda_mmcv.unpatch()


def test_patch_without_mmcv_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmcv.ops", None)
    monkeypatch.setitem(sys.modules, "mmcv.ops.multi_scale_deform_attn", None)
    with pytest.raises(ImportError, match=r"patch\(\) needs mmcv"):
        msda_mmcv.patch()
    assert msda_mmcv._originals == {}


def test_module_works_without_mmcv(monkeypatch):
    monkeypatch.setitem(sys.modules, "mmcv", None)
    module = msda_mmcv.MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=4)
    out = module(**_inputs(False, 2, dims=16))
    assert out.shape == (7, 2, 16)
