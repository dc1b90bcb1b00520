"""ONNX export of the v2 op (msda.ms_deform_attn_v2): unequal points per level and the
discrete method, with plain torch.onnx.export (both exporters), run in onnxruntime.

As for v1 (test_onnx_export.py): exported at one shape, run at the export shape and two
others, against eager msda in float32 (<= 1e-4 abs), with locations outside the map,
non-finite and huge. Equal points with the default method take v1's op (its export is
tested there); here they are checked once for TensorRT's node, which the other cases
must refuse with msda's message.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import msda
import msda.onnx
from cases_v2 import make_case_v2
from test_onnx_export import EXPORT_SHAPES, OP_DYNAMIC, OP_INPUTS, RUN_SHAPES, export, export_file, node_of
from test_onnx_export import run as run_positional

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.msda, "ms_deform_attn_v2_forward"), reason="needs msda's v2 op")

ATOL = 1e-4
M, D = 2, 5
# (points per level, method): unequal points, a level without points, the discrete method with equal
# points, no points at all
CASES = [([3, 6], "default"), ([3, 6], "discrete"), ([0, 4], "default"), ([2, 0], "discrete"), ([3, 3], "discrete"),
         ([0, 0], "default")]


class OpV2(torch.nn.Module):
    def __init__(self, points: list[int], method: str) -> None:
        super().__init__()
        self.points, self.method = points, method

    def forward(self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return msda.ms_deform_attn_v2(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, self.points, self.method
        )


def inputs_v2(N: int, Lq: int, shapes, points: list[int], method: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    case = make_case_v2(N, Lq, M, D, shapes, points, method, seed, value_dtype=torch.float32)
    return case.inputs


def run(session: "ort.InferenceSession", args) -> torch.Tensor:
    """Feeds by name: with no points at all the TorchScript exporter drops the unused level tables."""
    if len(session.get_inputs()) == len(args):
        return run_positional(session, args)
    names = {i.name for i in session.get_inputs()}
    feeds = {name: a.numpy() for name, a in zip(OP_INPUTS, args) if name in names}
    return torch.from_numpy(session.run(None, feeds)[0])


def case_id(case) -> str:
    points, method = case
    return f"{method}-{'-'.join(map(str, points))}"


@pytest.fixture(scope="module", params=[(c, e) for c in CASES for e in ("dynamo", "torchscript")],
                ids=[f"{case_id(c)}-{e}" for c in CASES for e in ("dynamo", "torchscript")])
def session_v2(request, tmp_path_factory):
    """(points, method, onnxruntime session of the exported op)."""
    (points, method), exporter = request.param
    path = str(tmp_path_factory.mktemp("onnx_v2") / "op.onnx")
    args = inputs_v2(*RUN_SHAPES[0][:2], RUN_SHAPES[0][2], points, method)
    session = export(OpV2(points, method), args, path, OP_INPUTS, OP_DYNAMIC, dynamo=exporter == "dynamo")
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert not ops & {"ATen", "GridSample"}, ops  # standard operators only, no runtime's edge rules
    return points, method, session


@pytest.mark.parametrize("N,Lq,shapes", RUN_SHAPES)
def test_op_v2_matches_eager_at_export_and_other_shapes(session_v2, N, Lq, shapes):
    points, method, session = session_v2
    args = inputs_v2(N, Lq, shapes, points, method, seed=N + Lq)
    got = run(session, args)
    want = msda.ms_deform_attn_v2(*args, points, method)
    assert got.shape == want.shape == (N, Lq, M * D)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
def test_op_v2_nonfinite_and_far_locations(session_v2, bad):
    # default: such samples contribute nothing, whatever their weight; discrete: NaN contributes
    # nothing, +-inf and +-1e30 read the border pixel (eager's rule, spec of the v2 op)
    points, method, session = session_v2
    value, shapes, starts, locations, weights = inputs_v2(3, 11, [(9, 13), (5, 1)], points, method, seed=3)
    locations, weights = locations.clone(), weights.clone()
    hit = torch.zeros(weights.shape, dtype=torch.bool)
    hit[:, ::2, :, ::2] = True
    hit[1, :, 1, :] = True
    odd = torch.arange(weights.shape[-1]) % 2 == 1
    locations[..., 0] = torch.where(hit & ~odd, bad, locations[..., 0])
    locations[..., 1] = torch.where(hit & odd, bad, locations[..., 1])
    if method == "default" or bad != bad:  # those samples count for nothing: weights NaN, inf or huge
        bad_weights = torch.tensor([float("nan"), float("inf"), 1e30])
        weights[hit] = bad_weights[torch.arange(int(hit.sum())) % 3]
    got = run(session, (value, shapes, starts, locations, weights))
    want = msda.ms_deform_attn_v2(value, shapes, starts, locations, weights, points, method)
    assert torch.isfinite(got).all() and torch.isfinite(want).all()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    if method == "default" or bad != bad:
        # the rule itself, independently of msda's kernels
        cleared = msda.ms_deform_attn_v2(value, shapes, starts, locations.masked_fill(hit[..., None], 0.5),
                                         weights.masked_fill(hit, 0.0), points, method)
        torch.testing.assert_close(got, cleared, atol=ATOL, rtol=0)


def test_discrete_index_is_float32_arithmetic(tmp_path):
    # trunc(loc * W + 0.5) with loc * W rounded to float32 first: a location whose exact product
    # is just below .5 past a pixel but rounds up to it in float32 reads the next pixel, as eager does
    W = 13
    loc = torch.tensor(3.5 / W, dtype=torch.float32)  # float32(3.5/13) * 13 rounds to 3.5 exactly or beside it
    shapes = [(1, W), (1, 1)]
    points = [1, 0]
    value, spatial_shapes, starts, locations, weights = inputs_v2(1, 1, shapes, points, "discrete")
    locations = locations.clone()
    locations[..., 0], locations[..., 1] = loc, 0.5
    session = export(OpV2(points, "discrete"), (value, spatial_shapes, starts, locations, weights),
                     str(tmp_path / "d.onnx"), OP_INPUTS, {}, dynamo=True)
    for offset in range(-3, 4):  # neighbouring float32 values around the boundary
        locations[..., 0] = loc + offset * torch.finfo(torch.float32).eps * loc
        args = (value, spatial_shapes, starts, locations, weights)
        torch.testing.assert_close(run(session, args), msda.ms_deform_attn_v2(*args, points, "discrete"), atol=0, rtol=0)


# ---- TensorRT's node ---------------------------------------------------------------------------


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_tensorrt_node_for_equal_points_default(tmp_path, dynamo):
    args = inputs_v2(2, 7, EXPORT_SHAPES, [3, 3], "default")
    path = str(tmp_path / "trt.onnx")
    with msda.onnx.tensorrt_plugin():
        export_file(OpV2([3, 3], "default"), args, path, OP_INPUTS, OP_DYNAMIC, dynamo)
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    node = node_of(model, msda.onnx.TENSORRT_OP)
    assert node.domain == msda.onnx.TENSORRT_DOMAIN
    if not dynamo:
        return  # the TorchScript exporter's reshape leaves the locations' shape to the runtime
    # the plugin's (N, Lq, M, L, P, 2) locations: v2's (N, Lq, M, L*P, 2) reshaped in the graph
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    infos = {v.name: v for v in [*inferred.input, *inferred.value_info]}
    loc_dims = infos[node.input[3]].type.tensor_type.shape.dim
    assert [d.dim_value for d in loc_dims][2:] == [M, 2, 3, 2]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("points,method", [([3, 6], "default"), ([3, 3], "discrete"), ([0, 0], "default")])
def test_tensorrt_refuses_what_its_plugin_cannot_compute(tmp_path, dynamo, points, method):
    args = inputs_v2(2, 7, EXPORT_SHAPES, points, method)
    with msda.onnx.tensorrt_plugin(), pytest.raises(Exception) as info:
        export_file(OpV2(points, method), args, str(tmp_path / "bad.onnx"), OP_INPUTS, {}, dynamo)
    message = str(info.value)
    assert msda.onnx.TENSORRT_OP in message and f"points_per_level={points}" in message, message
    assert f"method={method!r}" in message and "zero attention weights" in message


# ---- a program exported by the user ------------------------------------------------------------


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_decompose_and_translation_table_for_v2_nodes(tmp_path, method):
    points = [3, 6]
    args = inputs_v2(*RUN_SHAPES[0][:2], RUN_SHAPES[0][2], points, method)
    dims = {n: torch.export.Dim(n) for n in ("N", "S", "Lq")}
    shapes = tuple({a: dims[d] for a, d in OP_DYNAMIC.get(n, {}).items()} or None for n in OP_INPUTS)
    program = torch.export.export(OpV2(points, method), args, dynamic_shapes=shapes)
    assert torch.ops.msda.ms_deform_attn_v2_forward.default in {n.target for n in program.graph.nodes}
    path = str(tmp_path / "decomposed.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(msda.onnx.decompose(program), (), path, dynamo=True, input_names=OP_INPUTS)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    other = inputs_v2(*RUN_SHAPES[1][:2], RUN_SHAPES[1][2], points, method, seed=9)
    torch.testing.assert_close(run(session, other), msda.ms_deform_attn_v2(*other, points, method), atol=ATOL, rtol=0)
    with pytest.raises(Exception, match="takes the same number of points on every level"):
        torch.onnx.export(program, (), str(tmp_path / "t.onnx"), dynamo=True,
                          custom_translation_table=msda.onnx.translation_table())


# ---- transformers' v2 layers with msda.integrations.transformers.enable() -----------------------
# Whole tiny D-FINE models do not export faithfully in transformers 5.24 with or without msda (the
# TorchScript exporter's file differs from eager by up to 4.4 in the logits even without msda), so the
# deformable attention layers that call the v2 function are exported here, the image size fixed by
# their spatial_shapes_list.


class HfV2Layer(torch.nn.Module):
    """A D-FINE or RT-DETRv2 decoder attention layer with tensor inputs (build and run it with msda enabled)."""

    SHAPES = [(6, 7), (3, 4)]

    def __init__(self, family: str, points, method: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        if family == "d_fine":
            from transformers import DFineConfig
            from transformers.models.d_fine import modeling_d_fine as modeling

            config = DFineConfig(d_model=32, decoder_attention_heads=2, num_feature_levels=2,
                                 decoder_n_points=points, decoder_method=method)
            self.layer = modeling.DFineMultiscaleDeformableAttention(config).eval()
        else:
            from transformers import RTDetrV2Config
            from transformers.models.rt_detr_v2 import modeling_rt_detr_v2 as modeling

            config = RTDetrV2Config(d_model=32, decoder_attention_heads=2, num_feature_levels=2,
                                    decoder_n_levels=2, decoder_n_points=points, decoder_method=method)
            self.layer = modeling.RTDetrV2MultiscaleDeformableAttention(config).eval()
        with torch.no_grad():  # offsets that leave the map
            for p in self.layer.parameters():
                p.add_(torch.randn_like(p) * 0.3)

    def forward(self, hidden, reference_points, memory):
        spatial_shapes = torch.tensor(self.SHAPES)
        return self.layer(hidden, reference_points=reference_points, encoder_hidden_states=memory,
                          spatial_shapes=spatial_shapes, spatial_shapes_list=self.SHAPES)[0]

    @classmethod
    def inputs(cls, N: int, Lq: int, seed: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        S = sum(h * w for h, w in cls.SHAPES)
        return (torch.randn(N, Lq, 32, generator=gen), torch.rand(N, Lq, 1, 4, generator=gen) * 0.8 + 0.1,
                torch.randn(N, S, 32, generator=gen))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("family,points,method", [("d_fine", [3, 6], "default"), ("d_fine", [2, 0], "discrete"),
                                                  ("rt_detr_v2", 3, "discrete")])
def test_transformers_v2_layer_exports(tmp_path, monkeypatch, dynamo, family, points, method):
    pytest.importorskip("transformers.models.d_fine")
    # transformers' own input checks (torch._check_tensor_all: aten._is_all_true) have no ONNX
    # translation; transformers' switch turns them off (nothing of msda's)
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")
    import msda.integrations.transformers as msda_hf
    from msda.integrations import _hf_forwards

    calls = []
    real = _hf_forwards.ms_deform_attn_v2
    _hf_forwards.ms_deform_attn_v2 = lambda *a: calls.append(a[-2:]) or real(*a)
    handle = msda_hf.enable()
    try:
        layer = HfV2Layer(family, points, method)
        names = ["hidden", "reference_points", "memory"]
        dynamic = {"hidden": {0: "N", 1: "Lq"}, "reference_points": {0: "N", 1: "Lq"}, "memory": {0: "N"}}
        session = export(layer, layer.inputs(2, 5, 0), str(tmp_path / "hf.onnx"), names, dynamic, dynamo)
        assert calls and calls[0] == (points if isinstance(points, list) else [points] * 2, method), calls
        for seed, (N, Lq) in enumerate([(2, 5), (3, 9), (1, 2)]):
            args = layer.inputs(N, Lq, seed + 1)
            with torch.no_grad():
                want = layer(*args)
            torch.testing.assert_close(run(session, args), want, atol=ATOL, rtol=0)
    finally:
        _hf_forwards.ms_deform_attn_v2 = real
        handle.disable()


def test_tiny_d_fine_model_exports(tmp_path, monkeypatch):
    # A whole D-FINE detector (random config, 3 levels with 3, 6, 3 points) through the dynamo exporter.
    pytest.importorskip("transformers.models.d_fine")
    from test_integrations_transformers import _resnet
    from transformers import DFineConfig, DFineForObjectDetection, RTDetrResNetConfig

    import msda.integrations.transformers as msda_hf

    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")  # see test_transformers_v2_layer_exports
    torch.manual_seed(0)
    config = DFineConfig(
        backbone_config=_resnet(RTDetrResNetConfig), d_model=32, encoder_hidden_dim=32, encoder_layers=1,
        encoder_in_channels=[16, 16, 16], encoder_ffn_dim=32, decoder_layers=2, decoder_ffn_dim=32,
        decoder_attention_heads=2, encoder_attention_heads=2, num_queries=10, decoder_n_points=[3, 6, 3],
        num_labels=3, decoder_in_channels=[32, 32, 32], num_feature_levels=3, num_denoising=0, dropout=0.0,
    )

    class Raw(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = DFineForObjectDetection(config).eval()

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            return out.logits, out.pred_boxes

    with msda_hf.enable():
        model = Raw()
        images = [torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(s)) for s in range(2)]
        path = str(tmp_path / "d_fine.onnx")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (images[0],), path, dynamo=True, input_names=["pixel_values"])
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        for x in images:
            with torch.no_grad():
                want = model(x)
            got = torch.cat([torch.from_numpy(g) for g in session.run(None, {"pixel_values": x.numpy()})], -1)
            want = torch.cat(want, -1)  # (N, queries, labels + 4)
            # the encoder's top-k query selection may order near-ties differently: match queries first
            distance = torch.cdist(got.double(), want.double(), p=float("inf"))
            match = distance.argmin(-1)
            assert all(sorted(m.tolist()) == list(range(want.shape[1])) for m in match), match
            torch.testing.assert_close(got, torch.stack([w[m] for w, m in zip(want, match)]), atol=ATOL, rtol=0)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert "GridSample" not in ops  # msda's decomposition, not transformers' grid_sample
