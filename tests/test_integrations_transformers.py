"""msda.integrations.transformers against Hugging Face transformers' own code.

Models come from tiny random configs (nothing is downloaded). Every model's
sampling offsets are jittered first: transformers initialises them to whole
pixels, where the bilinear gradient is one-sided and grid_sample's gradient
is not the float64 one, so a comparison of location gradients there would
compare two valid one-sided answers.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

import msda  # noqa: E402
import msda.integrations.transformers as msda_hf  # noqa: E402
from msda.integrations import _hf_forwards, _shared  # noqa: E402

ATOL = 1e-5


def _resnet(cls):
    return cls(
        embedding_size=8,
        hidden_sizes=[8, 16, 16, 16],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )


def _jitter_offsets(model: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for module in model.modules():
            linear = getattr(module, "sampling_offsets", None)
            if isinstance(linear, torch.nn.Linear):
                linear.weight.add_(torch.randn(linear.weight.shape, generator=generator) * 0.05)
                linear.bias.add_(torch.rand(linear.bias.shape, generator=generator) - 0.5)


def _deformable_detr():
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    config = DeformableDetrConfig(
        use_timm_backbone=False, backbone_config=_resnet(ResNetConfig), d_model=32, encoder_layers=1,
        decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, num_queries=10, encoder_n_points=2, decoder_n_points=2, num_labels=3, dropout=0.0,
    )
    model = DeformableDetrForObjectDetection(config)
    pixel_mask = torch.ones(2, 64, 80, dtype=torch.long)
    pixel_mask[1, :, 56:] = 0  # the second image is padded on the right
    return model, {"pixel_values": torch.randn(2, 3, 64, 80), "pixel_mask": pixel_mask}, ("logits", "pred_boxes")


def _rt_detr():
    from transformers import RTDetrConfig, RTDetrForObjectDetection, RTDetrResNetConfig

    config = RTDetrConfig(
        backbone_config=_resnet(RTDetrResNetConfig), d_model=32, encoder_hidden_dim=32,
        encoder_in_channels=[16, 16, 16], encoder_ffn_dim=32, decoder_layers=2, decoder_ffn_dim=32,
        decoder_attention_heads=2, encoder_attention_heads=2, num_queries=10, decoder_n_points=3, num_labels=3,
        decoder_in_channels=[32, 32, 32], num_feature_levels=3, num_denoising=0, dropout=0.0,
    )
    return RTDetrForObjectDetection(config), {"pixel_values": torch.randn(2, 3, 64, 64)}, ("logits", "pred_boxes")


def _grounding_dino():
    from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, ResNetConfig

    text = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    config = GroundingDinoConfig(
        use_timm_backbone=False, backbone_config=_resnet(ResNetConfig), text_config=text, d_model=64,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=10, encoder_n_points=2, decoder_n_points=2,
        max_text_len=16, fusion_ffn_dim=32, dropout=0.0, fusion_dropout=0.0, fusion_droppath=0.0,
    )
    pixel_mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixel_mask[0, 48:, :] = 0
    inputs = {
        "pixel_values": torch.randn(2, 3, 64, 64),
        "pixel_mask": pixel_mask,
        "input_ids": torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(1)),
    }
    return GroundingDinoForObjectDetection(config), inputs, ("logits", "pred_boxes")


def _mask2former():
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    swin = SwinConfig(
        image_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        dim_feedforward=32, num_attention_heads=2, encoder_layers=1, decoder_layers=2, num_queries=5,
        num_labels=3, common_stride=4, dropout=0.0,
    )
    outputs = ("class_queries_logits", "masks_queries_logits")
    return Mask2FormerForUniversalSegmentation(config), {"pixel_values": torch.randn(2, 3, 64, 64)}, outputs


FAMILIES = {
    "deformable_detr": _deformable_detr,
    "rt_detr": _rt_detr,
    "grounding_dino": _grounding_dino,
    "mask2former": _mask2former,
}


@pytest.fixture(autouse=True)
def _always_disabled():
    msda_hf.disable()
    yield
    msda_hf.disable()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    model, inputs, outputs = FAMILIES[request.param]()
    _jitter_offsets(model, torch.Generator().manual_seed(2))
    return request.param, model, inputs, outputs


def _run(model, inputs, names, train=False):
    model.train(train)
    if train:
        model.zero_grad(set_to_none=True)
        out = model(**inputs)
        generator = torch.Generator().manual_seed(3)
        loss = sum((getattr(out, n) * torch.randn(getattr(out, n).shape, generator=generator)).sum() for n in names)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        out = model(**inputs)
    return {n: getattr(out, n) for n in names}


def test_import_msda_imports_neither_library():
    code = "import sys, msda, msda.integrations; print('transformers' in sys.modules, 'mmcv' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_outputs_equal_transformers_path(family):
    name, model, inputs, names = family
    want = _run(model, inputs, names)
    with msda_hf.enable() as handle:
        got = _run(model, inputs, names)
    assert any(s.startswith(name + ".") for s in handle.switched)
    for n in names:
        torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=0)
    again = _run(model, inputs, names)
    for n in names:  # disable() restores transformers' path bit for bit
        assert torch.equal(again[n], want[n]), n


def test_training_gradients_agree(family):
    # The two float32 paths round differently; each parameter's gradient from
    # msda must be as close to the float64 gradient as transformers' own is.
    name, model, inputs, names = family
    want = _run(model, inputs, names, train=True)
    with msda_hf.enable():
        got = _run(model, inputs, names, train=True)
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    truth = _run(copy.deepcopy(model).double(), inputs64, names, train=True)
    model.eval()
    assert got.keys() == want.keys() == truth.keys()
    for n in want:
        scale = max(1.0, want[n].abs().max().item())
        torch.testing.assert_close(got[n], want[n], atol=2e-5 * scale, rtol=1e-4, msg=n)
        error, own_error = ((g.double() - truth[n]).abs().max().item() for g in (got[n], want[n]))
        assert error <= 2 * own_error + 1e-6 * scale, (n, error, own_error)


def test_msda_really_runs(family, monkeypatch):
    # Guard against a patch that silently leaves transformers' path in place.
    name, model, inputs, names = family
    calls = []
    real = _hf_forwards.ms_deform_attn
    spy = lambda *a: calls.append(1) or real(*a)  # noqa: E731
    monkeypatch.setattr(_hf_forwards, "ms_deform_attn", spy)
    monkeypatch.setattr(_shared, "ms_deform_attn", spy)
    with msda_hf.enable():
        _run(model, inputs, names)
    assert calls


def test_models_built_after_enable_use_msda(monkeypatch):
    calls = []
    real = _hf_forwards.ms_deform_attn
    monkeypatch.setattr(_hf_forwards, "ms_deform_attn", lambda *a: calls.append(1) or real(*a))
    with msda_hf.enable():
        torch.manual_seed(0)
        model, inputs, names = _deformable_detr()
        _run(model, inputs, names)
    assert len(calls) == 3  # 1 encoder and 2 decoder layers


def _capture_locations(model, inputs):
    captured = []
    layers = [m for m in model.modules() if type(m).__name__ == msda_hf.LAYER_NAME]
    hooks = [m.register_forward_pre_hook(lambda mod, args: captured.append(args[4].clone())) for m in layers]
    try:
        with torch.no_grad():
            model.eval()(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return captured


@pytest.mark.parametrize("name", ["deformable_detr", "rt_detr", "grounding_dino"])
def test_fast_location_arithmetic_is_bitwise_equal(name):
    # Only the attention modules' arithmetic is switched here (the layer keeps
    # grid_sample), so every layer's sampling locations, and the model's
    # outputs, must be the same bits as transformers' own.
    torch.manual_seed(0)
    model, inputs, names = FAMILIES[name]()
    _jitter_offsets(model, torch.Generator().manual_seed(2))
    layer = next(type(m) for m in model.modules() if type(m).__name__ == msda_hf.LAYER_NAME)
    grid_sample_forward = vars(layer)["forward"]
    want = _capture_locations(model, inputs)
    want_out = _run(model, inputs, names)
    with msda_hf.enable() as handle:
        layer.forward = grid_sample_forward
        try:
            got = _capture_locations(model, inputs)
            got_out = _run(model, inputs, names)
        finally:
            layer.forward = _hf_forwards.layer_forward
    assert any(s.startswith(name + ".") for s in handle.fast_locations)
    assert len(got) == len(want) > 1
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    for n in names:
        assert torch.equal(got_out[n], want_out[n])


@pytest.mark.parametrize("coords", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("grad", [False, True])
def test_sampling_locations_match_broadcast_form(coords, dtype, grad):
    # float32 runs the in-place steps; bfloat16 offsets (float32 result) and
    # float64 offsets (float64 result, float32 reference points) do not.
    g = torch.Generator().manual_seed(coords)
    N, Lq, M, L, P = 2, 37, 3, 4, 5
    shapes = torch.tensor([[13, 17], [7, 9], [4, 5], [1, 3]])
    ref = torch.rand(N, Lq, L, coords, generator=g).requires_grad_(grad)
    offsets = (torch.randn(N, Lq, M, L, P, 2, generator=g) * 3).to(dtype).requires_grad_(grad)
    if coords == 2:  # transformers' broadcast arithmetic, written out
        normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1)
        want = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        want = ref[:, :, None, :, None, :2] + offsets / P * ref[:, :, None, :, None, 2:] * 0.5
    got = _shared.sampling_locations(ref, offsets, shapes, P)
    assert got.dtype == want.dtype and torch.equal(got, want)
    if grad:  # the in-place steps keep autograd right (the offsets' gradient: the same bits)
        grad_output = torch.randn(want.shape, generator=g).to(want.dtype)
        want_ref, want_off = torch.autograd.grad(want, (ref, offsets), grad_output)
        got_ref, got_off = torch.autograd.grad(got, (ref, offsets), grad_output)
        assert torch.equal(got_off, want_off)
        # the reference points' gradient sums over (M, P) in another order
        torch.testing.assert_close(got_ref, want_ref, atol=1e-5, rtol=1e-6)


def test_masked_fill_skipped_only_without_padding(monkeypatch):
    # The value is masked with a full copy; the wrapper skips it where no
    # pixel is padded (asked on the CPU in eager mode only), and must still
    # zero padded pixels when there are some, in inference and in training.
    fills = []
    real = torch.Tensor.masked_fill
    monkeypatch.setattr(torch.Tensor, "masked_fill", lambda *a: fills.append(1) or real(*a))
    torch.manual_seed(0)
    model, inputs, names = _deformable_detr()
    _jitter_offsets(model, torch.Generator().manual_seed(2))  # off the grid, where the gradients agree
    unpadded = dict(inputs, pixel_mask=torch.ones_like(inputs["pixel_mask"]))
    for batch in (inputs, unpadded):
        for train in (False, True):
            want = _run(model, batch, names, train=train)
            del fills[:]
            with msda_hf.enable():
                got = _run(model, batch, names, train=train)
            assert len(fills) == (3 if batch is inputs else 0)  # 1 encoder and 2 decoder layers fill, or none
            for n in got:
                torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=0)
    assert _shared.any_true(torch.zeros(3, dtype=torch.bool)) is False
    assert _shared.any_true(torch.tensor([False, True])) is True
    assert _shared.any_true(torch.zeros(3, dtype=torch.bool, device="meta")) is True  # not asked off the CPU


def test_disable_restores_the_exact_objects():
    from transformers.models.deformable_detr import modeling_deformable_detr as dd
    from transformers.models.mask2former import modeling_mask2former as m2f

    layer_forward = vars(dd.MultiScaleDeformableAttention)["forward"]
    wrapper_forward = vars(dd.DeformableDetrMultiscaleDeformableAttention)["forward"]
    function = m2f.multi_scale_deformable_attention
    handle = msda_hf.enable()
    assert vars(dd.MultiScaleDeformableAttention)["forward"] is not layer_forward
    assert m2f.multi_scale_deformable_attention is not function
    handle.disable()
    assert vars(dd.MultiScaleDeformableAttention)["forward"] is layer_forward
    assert vars(dd.DeformableDetrMultiscaleDeformableAttention)["forward"] is wrapper_forward
    assert m2f.multi_scale_deformable_attention is function


def test_enable_twice_and_nested_handles():
    from transformers.models.rt_detr import modeling_rt_detr as rt

    original = vars(rt.MultiScaleDeformableAttention)["forward"]
    with msda_hf.enable() as outer:
        with msda_hf.enable() as inner:
            assert inner.switched == outer.switched
        # the inner block's exit leaves the outer one's switch in place
        assert vars(rt.MultiScaleDeformableAttention)["forward"] is _hf_forwards.layer_forward
        inner.disable()  # releasing a handle twice is harmless
        assert vars(rt.MultiScaleDeformableAttention)["forward"] is _hf_forwards.layer_forward
    assert vars(rt.MultiScaleDeformableAttention)["forward"] is original
    msda_hf.disable()
    msda_hf.disable()
    assert vars(rt.MultiScaleDeformableAttention)["forward"] is original


def test_enable_model_switches_stored_function():
    # d_fine keeps the v2 function on the module at construction.
    from transformers import DFineConfig
    from transformers.models.d_fine import modeling_d_fine as dfine

    torch.manual_seed(0)
    config = DFineConfig(d_model=32, decoder_attention_heads=2, num_feature_levels=2, decoder_n_points=3)
    layer = dfine.DFineMultiscaleDeformableAttention(config).eval()
    original = dfine.multi_scale_deformable_attention_v2
    assert layer.ms_deformable_attn_core is original
    shapes = [(6, 7), (3, 4)]
    hidden = torch.randn(2, 5, 32)
    memory = torch.randn(2, sum(h * w for h, w in shapes), 32)
    kwargs = dict(
        reference_points=torch.rand(2, 5, 1, 4) * 0.5 + 0.25,
        encoder_hidden_states=memory,
        spatial_shapes=torch.tensor(shapes),
        spatial_shapes_list=shapes,
    )
    with torch.no_grad():
        want, _ = layer(hidden, **kwargs)
        with msda_hf.enable(layer) as handle:
            assert handle.instances == 1 and layer.ms_deformable_attn_core is not original
            got, _ = layer(hidden, **kwargs)
    assert layer.ms_deformable_attn_core is original
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # A layer built while msda is enabled stores msda's function; after
    # disable() that function runs transformers' code again.
    with msda_hf.enable():
        built_during = dfine.DFineMultiscaleDeformableAttention(config).eval()
        built_during.load_state_dict(layer.state_dict())
    assert built_during.ms_deformable_attn_core is not original
    with torch.no_grad():
        after, _ = built_during(hidden, **kwargs)
    assert torch.equal(after, want)  # transformers' bits, not msda's (which differ in the last places)
    assert not torch.equal(got, want)


@pytest.mark.parametrize("points, method", [([2, 3], "default"), ([3, 3], "discrete"), ([2, 3], "discrete")])
def test_v2_points_per_level_and_discrete_run_on_msda(points, method):
    # d_fine with a different number of points per level, or the discrete
    # method: msda's v2 op computes them, equal to transformers' own code.
    from transformers import DFineConfig
    from transformers.models.d_fine import modeling_d_fine as dfine

    torch.manual_seed(0)
    config = DFineConfig(
        d_model=32, decoder_attention_heads=2, num_feature_levels=2, decoder_n_points=points, decoder_method=method
    )
    shapes = [(6, 7), (3, 4)]
    kwargs = dict(
        reference_points=torch.rand(2, 5, 1, 4) * 0.5 + 0.25,
        encoder_hidden_states=torch.randn(2, sum(h * w for h, w in shapes), 32),
        spatial_shapes=torch.tensor(shapes),
        spatial_shapes_list=shapes,
    )
    hidden = torch.randn(2, 5, 32)
    original = dfine.multi_scale_deformable_attention_v2
    before = dfine.DFineMultiscaleDeformableAttention(config).eval()
    calls = []
    with torch.no_grad():
        want, _ = before(hidden, **kwargs)
        with msda_hf.enable():
            layer = dfine.DFineMultiscaleDeformableAttention(config).eval()
            layer.load_state_dict(before.state_dict())
            assert layer.ms_deformable_attn_core is not original
            import msda.integrations._hf_forwards as forwards

            real = forwards.ms_deform_attn_v2
            forwards.ms_deform_attn_v2 = lambda *a: calls.append(a[-2:]) or real(*a)
            try:
                got, _ = layer(hidden, **kwargs)
            finally:
                forwards.ms_deform_attn_v2 = real
    assert calls == [(points, method)]  # msda's op ran, with transformers' arguments
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_compile_fullgraph_of_patched_attention():
    torch.manual_seed(0)
    model, inputs, _ = _deformable_detr()
    _jitter_offsets(model, torch.Generator().manual_seed(2))
    attention = model.model.encoder.layers[0].self_attn
    captured = {}
    hook = attention.register_forward_pre_hook(lambda m, a, k: captured.update(k), with_kwargs=True)
    with torch.no_grad():
        model.eval()(**inputs)
    hook.remove()
    with torch.no_grad():
        want = attention(**captured)[0]
    torch._dynamo.reset()
    with msda_hf.enable():
        compiled = torch.compile(attention, fullgraph=True, dynamic=False)
        with torch.no_grad():
            got = compiled(**captured)[0]
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_compile_fullgraph_of_patched_function():
    # mask2former's pixel decoder calls the function with a Python list of shapes.
    torch.manual_seed(0)
    model, inputs, _ = _mask2former()
    _jitter_offsets(model, torch.Generator().manual_seed(2))
    attention = next(m for m in model.modules() if type(m).__name__.endswith("EncoderMultiscaleDeformableAttention"))
    captured = {}
    hook = attention.register_forward_pre_hook(lambda m, a, k: captured.update(k, args=a), with_kwargs=True)
    with torch.no_grad():
        model.eval()(**inputs)
    hook.remove()
    args = captured.pop("args")
    with torch.no_grad():
        want = attention(*args, **captured)[0]
    torch._dynamo.reset()
    with msda_hf.enable():
        compiled = torch.compile(attention, fullgraph=True, dynamic=False)
        with torch.no_grad():
            got = compiled(*args, **captured)[0]
    torch._dynamo.reset()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_autocast_bfloat16_runs_msda():
    torch.manual_seed(0)
    model, inputs, names = _deformable_detr()
    _jitter_offsets(model, torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _run(model, inputs, names)
        with msda_hf.enable():
            got = _run(model, inputs, names)
    for n in names:  # both paths round to bfloat16 (unit roundoff 2**-8) in different places
        torch.testing.assert_close(got[n].float(), want[n].float(), atol=0.1, rtol=0.05)


def test_kernels_kernelize_maps_the_layer_to_msda():
    kernels = pytest.importorskip("kernels")
    from transformers.models.deformable_detr import modeling_deformable_detr as dd

    torch.manual_seed(0)
    model, inputs, names = _deformable_detr()
    _jitter_offsets(model, torch.Generator().manual_seed(2))
    want = _run(model, inputs, names)
    # What transformers' use_kernel_forward_from_hub decorator does with a
    # kernels version it accepts (>= 0.18.2; this registry serves 0.17.2).
    cls = dd.MultiScaleDeformableAttention
    assert "kernel_layer_name" not in vars(cls)
    kernels.replace_kernel_forward_from_hub(cls, msda_hf.LAYER_NAME)
    try:
        for mode in (kernels.Mode.INFERENCE, kernels.Mode.TRAINING | kernels.Mode.TORCH_COMPILE):
            with kernels.use_kernel_mapping(msda_hf.kernel_mapping()):
                kernels.kernelize(model, mode=mode, device="cpu", use_fallback=False)
            layers = [m for m in model.modules() if isinstance(m, cls)]
            assert layers and all(m.forward.__func__ is msda_hf.MultiScaleDeformableAttention.forward for m in layers)
            got = _run(model, inputs, names)
            for n in names:
                torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=0)
    finally:
        del cls.kernel_layer_name, cls.kernel_condition
        for m in model.modules():
            vars(m).pop("forward", None)


# ---- bad input: a stand-in package on sys.path plays the installed transformers


def _fake_package(tmp_path, monkeypatch, files: dict[str, str]) -> str:
    name = f"fake_transformers_{abs(hash(tmp_path)) % 10**8}"
    root = tmp_path / name
    (root / "models").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "models" / "__init__.py").write_text("")
    for relative, text in files.items():
        path = root / "models" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / "__init__.py").write_text("")
        path.write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(msda_hf, "PACKAGE", name)
    return name


def test_missing_transformers_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(msda_hf, "PACKAGE", "msda_no_such_package")
    with pytest.raises(ImportError, match="needs the 'msda_no_such_package' package"):
        msda_hf.enable()
    assert msda_hf._state.originals == {}


def test_version_without_the_layer_is_a_clear_error(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch, {"detr/modeling_detr.py": "class DetrAttention:\n    pass\n"})
    with pytest.raises(RuntimeError, match="has no 'MultiScaleDeformableAttention' layer"):
        msda_hf.enable()
    assert msda_hf._state.originals == {}


GOOD_LAYER = """
class MultiScaleDeformableAttention(object):
    def forward(self, value, value_spatial_shapes, value_spatial_shapes_list, level_start_index,
                sampling_locations, attention_weights, im2col_step):
        return "original"
"""
OTHER_LAYER = """
class MultiScaleDeformableAttention(object):
    def forward(self, value, spatial_shapes, sampling_locations, attention_weights):
        return "original"

def multi_scale_deformable_attention(value, shapes, locations):
    return "original"
"""
# the named family with an attention module whose forward is not the one checked
CHANGED_WRAPPER = GOOD_LAYER + """
def torch_compilable_check(*args):
    pass

class DeformableDetrMultiscaleDeformableAttention(object):
    def forward(self, hidden_states, attention_mask=None):
        return "a newer version"
"""


def test_unknown_signatures_are_left_alone_and_named(tmp_path, monkeypatch):
    name = _fake_package(
        tmp_path,
        monkeypatch,
        {
            "good/modeling_good.py": GOOD_LAYER,
            "other/modeling_other.py": OTHER_LAYER,
            "deformable_detr/modeling_deformable_detr.py": CHANGED_WRAPPER,
        },
    )
    with pytest.warns(UserWarning, match="left these on transformers' own code") as record:
        handle = msda_hf.enable()
    message = str(record[0].message)
    assert "other.MultiScaleDeformableAttention" in message and "other.multi_scale_deformable_attention" in message
    assert "deformable_detr.DeformableDetrMultiscaleDeformableAttention" in message
    assert handle.switched == ("deformable_detr.MultiScaleDeformableAttention", "good.MultiScaleDeformableAttention")
    assert handle.fast_locations == ()
    other = sys.modules[f"{name}.models.other.modeling_other"]
    assert other.MultiScaleDeformableAttention().forward(1, 2, 3, 4) == "original"
    assert other.multi_scale_deformable_attention(1, 2, 3) == "original"
    wrapper = sys.modules[f"{name}.models.deformable_detr.modeling_deformable_detr"]
    assert wrapper.DeformableDetrMultiscaleDeformableAttention().forward(1) == "a newer version"
    good = sys.modules[f"{name}.models.good.modeling_good"].MultiScaleDeformableAttention
    assert vars(good)["forward"] is _hf_forwards.layer_forward
    handle.disable()
    assert good().forward(*range(7)) == "original"


def test_find_sites_scans_without_importing():
    before = set(sys.modules)
    sites = msda_hf.find_sites()
    assert {s.family for s in sites} >= {"deformable_detr", "rt_detr", "grounding_dino", "mask2former"}
    assert not [m for m in set(sys.modules) - before if ".models." in m]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers 5.24: every site is understood
        with msda_hf.enable() as handle:
            assert set(handle.switched) == {str(s) for s in sites} and handle.skipped == {}


def test_projection_outputs_reused_only_when_nobody_holds_them(monkeypatch):
    # In inference the attention modules write the softmax into the
    # attention_weights projection's output and the locations into the
    # sampling_offsets projection's output (no allocation of their size). A
    # forward hook may keep those outputs: then they must stay as returned.
    torch.manual_seed(0)
    model, inputs, names = _deformable_detr()
    want = _run(model, inputs, names)
    reused = []
    real = _shared.reusable_output
    monkeypatch.setattr(_hf_forwards, "reusable_output", lambda m, t, i: reused.append(real(m, t, i)) or reused[-1])
    with msda_hf.enable():
        got = _run(model, inputs, names)
        assert reused and all(reused)  # no hook: every projection output was reused
        for n in names:
            torch.testing.assert_close(got[n], want[n], atol=ATOL, rtol=0)
        kept = []
        projections = [m for name, m in model.named_modules() if name.endswith(("sampling_offsets", "attention_weights"))]
        hooks = [m.register_forward_hook(lambda mod, args, out: kept.append((out, out.clone()))) for m in projections]
        del reused[:]
        try:
            _run(model, inputs, names)
        finally:
            for h in hooks:
                h.remove()
        assert len(kept) == len(projections) > 0
        assert reused and not any(reused)  # every projection is hooked now
        for out, copy_at_return in kept:
            assert torch.equal(out, copy_at_return)


@pytest.mark.skipif(not msda._extension.AVAILABLE, reason="the cache belongs to the compiled extension")
def test_position_add_is_bitwise_equal_and_cached_only_without_autograd():
    # Both integrations add the position embeddings with add_position: in
    # eager CPU code that autograd does not record, into a block of msda's
    # CPU cache (tens of MB at the encoder's shapes); the same bits always.
    import msda.cpu_cache as cpu_cache

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 1100, 256, generator=g)  # 2.1 MiB per image pair: cached
    for pos in (torch.randn(2, 1100, 256, generator=g), torch.randn(1100, 256, generator=g).to(torch.bfloat16)):
        want = hidden + pos
        with torch.no_grad():
            before = cpu_cache.stats()
            got = _shared.add_position(hidden, pos)
            address = got.data_ptr()
            assert got.dtype == want.dtype and torch.equal(got, want)
            del got
            again = _shared.add_position(hidden, pos)
            assert torch.equal(again, want) and again.data_ptr() == address
            assert cpu_cache.stats().reuses > before.reuses
    leaf = hidden.clone().requires_grad_()
    before = cpu_cache.stats()
    got = _shared.add_position(leaf, pos)
    assert got.grad_fn is not None and torch.equal(got.detach(), hidden + pos)
    assert cpu_cache.stats() == before  # recorded by autograd: a plain tensor
    got.sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(leaf))



def test_an_output_that_is_the_projections_input_is_never_reused():
    # A projection replaced by one that returns its input (nn.Identity, a
    # pruned layer) hands back the caller's tensor: writing the softmax or the
    # locations into it would change the caller's hidden states.
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert _shared.reusable_output(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)(x), x)
        assert not _shared.reusable_output(torch.nn.Identity(), torch.nn.Identity()(x), x)
        assert not _shared.reusable_output(torch.nn.Identity(), x.view(10, 8), x)  # a view shares the memory
