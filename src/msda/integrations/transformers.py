"""Run Hugging Face transformers' multi-scale deformable attention on msda.

    import msda.integrations.transformers as msda_hf
    msda_hf.enable()          # every family of the installed transformers
    with msda_hf.enable(): ...  # or only inside a block

The families are found in the installed package's sources (a text scan of its
``models/*/modeling_*.py`` for the layer ``class MultiScaleDeformableAttention(``
and the functions ``def multi_scale_deformable_attention...(``); only the
modeling modules that contain one are imported. Each one is patched where
callers look it up at call time: the layer's ``forward`` on its class (so
models built before and after :func:`enable` both use msda), the function in
its module's globals. Anything whose signature is not the one msda implements
is left alone and named in a warning. :func:`disable` puts the originals back.

Transformers' ``attention_mask`` is True at valid pixels (msda's
``MSDeformAttn`` takes a padding mask, True at padding); the patched code keeps
transformers' convention, since it is transformers' modules that call it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import re
import textwrap
import threading
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

from torch import nn

from . import _hf_forwards
from ._hf_forwards import MultiScaleDeformableAttention

__all__ = ["enable", "disable", "find_sites", "kernel_mapping", "Handle", "Site", "MultiScaleDeformableAttention"]

# The package scanned; tests point it at a stand-in package.
PACKAGE = "transformers"

LAYER_NAME = "MultiScaleDeformableAttention"
_LAYER_RE = re.compile(r"^class MultiScaleDeformableAttention\(", re.M)
_FUNCTION_RE = re.compile(r"^def (multi_scale_deformable_attention\w*)\(", re.M)

# The signatures msda implements (parameter names, in order).
LAYER_PARAMS = (
    "self",
    "value",
    "value_spatial_shapes",
    "value_spatial_shapes_list",
    "level_start_index",
    "sampling_locations",
    "attention_weights",
    "im2col_step",
)
FUNCTION_PARAMS = ("value", "value_spatial_shapes", "sampling_locations", "attention_weights")
FUNCTION_V2_PARAMS = FUNCTION_PARAMS + ("num_points_list", "method")

# The one named list (see the issue): the attention modules whose forward gets
# the cheaper, bitwise-equal location arithmetic of
# _hf_forwards.sampling_locations. Each entry is accepted only when the
# installed forward's source is one that was read and tested against it
# (SHA-256 of the dedented source, first 16 hex digits); any other version
# keeps transformers' own forward, and msda still runs the layer.
FAST_LOCATION_MODULES = {
    "deformable_detr": "DeformableDetrMultiscaleDeformableAttention",
    "rt_detr": "RTDetrMultiscaleDeformableAttention",
    "grounding_dino": "GroundingDinoMultiscaleDeformableAttention",
    "mm_grounding_dino": "MMGroundingDinoMultiscaleDeformableAttention",
    "omdet_turbo": "OmDetTurboMultiscaleDeformableAttention",
    "lw_detr": "LwDetrMultiscaleDeformableAttention",
    "rf_detr": "RfDetrMultiscaleDeformableAttention",
    "pp_doclayout_v2": "PPDocLayoutV2MultiscaleDeformableAttention",
    "pp_doclayout_v3": "PPDocLayoutV3MultiscaleDeformableAttention",
    "pp_doclayout_v4": "PPDocLayoutV4MultiscaleDeformableAttention",
}
FAST_LOCATION_SOURCES = frozenset(
    {
        # transformers 5.24.0
        "1eca53b17c4b8023",  # deformable_detr, rt_detr, lw_detr, rf_detr, pp_doclayout_v2/v3/v4
        "45421814207cdc03",  # omdet_turbo (the same, total_elements spelt differently)
        "96584a5f22e8f18b",  # grounding_dino, mm_grounding_dino (output_attentions, not **kwargs)
    }
)


@dataclass(frozen=True)
class Site:
    """One thing msda can replace: a family's layer class or function."""

    family: str  # e.g. "deformable_detr"
    module: str  # the modeling module's import name
    kind: str  # "layer" or "function"
    name: str  # the class or function name

    def __str__(self) -> str:
        return f"{self.family}.{self.name}"


@dataclass
class Handle:
    """What :func:`enable` switched. A context manager: leaving the block (or
    :meth:`disable`) releases this handle; the originals come back when the
    last handle is released, or at once with the module's :func:`disable`."""

    switched: tuple[str, ...]
    skipped: dict[str, str]
    fast_locations: tuple[str, ...]
    instances: int = 0
    _generation: int = field(default=0, repr=False)
    _released: bool = field(default=False, repr=False)

    def disable(self) -> None:
        if not self._released:
            self._released = True
            _release(self._generation)

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disable()


@dataclass
class _State:
    users: int = 0
    # (owner, attribute) -> what owner.__dict__ held before (the exact object)
    originals: dict = field(default_factory=dict)
    # original function -> its msda replacement (for instance attributes)
    replacements: dict = field(default_factory=dict)
    # (weakref to module instance, attribute, original)
    instances: list = field(default_factory=list)
    report: Optional[tuple] = None
    # bumped by every restore, so a handle from before a disable() releases nothing
    generation: int = 0


_lock = threading.RLock()
_state = _State()


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"msda.integrations.transformers needs the '{PACKAGE}' package (pip install transformers), "
            f"which is not installed"
        )
    return Path(list(spec.submodule_search_locations)[0])


def find_sites() -> list[Site]:
    """The layers and functions in the installed transformers' sources, found
    by a text scan (nothing is imported)."""
    models = _package_dir() / "models"
    sites = []
    for path in sorted(models.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        module = f"{PACKAGE}.models.{path.parent.name}.{path.stem}"
        if _LAYER_RE.search(text):
            sites.append(Site(path.parent.name, module, "layer", LAYER_NAME))
        for name in _FUNCTION_RE.findall(text):
            sites.append(Site(path.parent.name, module, "function", name))
    return sites


def _params(fn: Callable) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _source_id(fn: Callable) -> str:
    try:
        source = textwrap.dedent(inspect.getsource(fn)).strip()
    except (OSError, TypeError):
        return ""
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def _set(owner: Any, attr: str, new: Any) -> None:
    key = (owner, attr)
    if key not in _state.originals:
        _state.originals[key] = vars(owner).get(attr, _MISSING)
    setattr(owner, attr, new)


_MISSING = object()


def _replacement(site: Site, found: Any) -> tuple[Optional[Callable], str]:
    """(the msda replacement, "") or (None, why not)."""
    if site.kind == "layer":
        forward = vars(found).get("forward") if isinstance(found, type) else None
        if forward is None:
            return None, "no forward defined on the class"
        params = _params(forward)
        if params != LAYER_PARAMS:
            return None, f"forward{params} is not forward{LAYER_PARAMS}"
        return _hf_forwards.layer_forward, ""
    if not callable(found):
        return None, "not a function"
    params = _params(found)
    if params == FUNCTION_PARAMS:
        return _hf_forwards.function, ""
    if params == FUNCTION_V2_PARAMS:
        generation = _state.generation
        return _hf_forwards.make_function_v2(found, lambda: _state.generation == generation), ""
    return None, f"signature {params} is neither {FUNCTION_PARAMS} nor {FUNCTION_V2_PARAMS}"


def _patch_all() -> tuple:
    sites = find_sites()
    if not sites:
        raise RuntimeError(
            f"the installed {PACKAGE} ({_package_dir()}) has no '{LAYER_NAME}' layer and no "
            f"'multi_scale_deformable_attention' function in models/*/modeling_*.py: nothing to switch to msda"
        )
    switched, skipped, fast = [], {}, []
    modules: dict[str, ModuleType] = {}
    for site in sites:
        try:
            module = modules.get(site.module) or importlib.import_module(site.module)
        except Exception as error:  # an optional dependency of that family is missing
            skipped[str(site)] = f"cannot import {site.module}: {type(error).__name__}: {error}"
            continue
        modules[site.module] = module
        found = getattr(module, site.name, None)
        new, why = _replacement(site, found)
        if new is None:
            skipped[str(site)] = why
            continue
        if site.kind == "layer":
            _set(found, "forward", new)
        else:
            _set(module, site.name, new)
            _state.replacements[found] = new
        switched.append(str(site))
    for family, class_name in FAST_LOCATION_MODULES.items():
        layer = f"{family}.{LAYER_NAME}"
        if layer not in switched:
            continue
        module = modules[next(s.module for s in sites if str(s) == layer)]
        cls = getattr(module, class_name, None)
        check = getattr(module, "torch_compilable_check", None)
        forward = vars(cls).get("forward") if isinstance(cls, type) else None
        if forward is None or check is None or _source_id(forward) not in FAST_LOCATION_SOURCES:
            skipped[f"{family}.{class_name}"] = (
                "forward differs from the versions the fast location arithmetic was checked against; "
                "it keeps transformers' arithmetic (msda still runs the attention)"
            )
            continue
        _set(cls, "forward", _hf_forwards.wrapper_forward(check))
        fast.append(f"{family}.{class_name}")
    if skipped:
        lines = "\n".join(f"  {name}: {why}" for name, why in skipped.items())
        warnings.warn(f"msda.integrations.transformers left these on transformers' own code:\n{lines}", stacklevel=3)
    return tuple(switched), skipped, tuple(fast)


def _patch_instances(model: nn.Module) -> int:
    # Families that store the function on the module at construction
    # (d_fine, deimv2: self.ms_deformable_attn_core = ...) keep the original in
    # models built before enable(); switch those attributes.
    count = 0
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            new = _state.replacements.get(value) if callable(value) else None
            if new is not None:
                _state.instances.append((weakref.ref(module), attr, value))
                setattr(module, attr, new)
                count += 1
    return count


def _restore() -> None:
    for (owner, attr), original in reversed(list(_state.originals.items())):
        if original is _MISSING:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    for ref, attr, original in _state.instances:
        module = ref()
        if module is not None:
            setattr(module, attr, original)
    _state.originals.clear()
    _state.replacements.clear()
    _state.instances.clear()
    _state.report = None
    _state.users = 0
    _state.generation += 1


def _release(generation: int) -> None:
    with _lock:
        if generation == _state.generation and _state.users > 0:
            _state.users -= 1
            if _state.users == 0:
                _restore()


def enable(model: Optional[nn.Module] = None) -> Handle:
    """Switch every family of the installed transformers to msda.

    Args:
        model: optionally, an existing model whose modules stored the function
            at construction (d_fine, deimv2); their attributes are switched too.
            Other models need nothing: their classes are patched.

    Returns:
        a :class:`Handle` naming what was switched and what was left alone.
        Calling ``enable`` again is harmless (it returns another handle).

    Raises:
        ImportError: transformers is not installed.
        RuntimeError: the installed transformers has nothing msda can replace.
    """
    with _lock:
        if _state.report is None:
            try:
                _state.report = _patch_all()
            except BaseException:
                _restore()
                raise
        _state.users += 1
        switched, skipped, fast = _state.report
        count = _patch_instances(model) if model is not None else 0
        return Handle(switched, dict(skipped), fast, count, _state.generation)


def disable() -> None:
    """Restore every original now (whatever handles are still open)."""
    with _lock:
        _restore()


def kernel_mapping() -> dict:
    """A layer mapping for the ``kernels`` library (``kernels.use_kernel_mapping``
    or ``kernels.register_kernel_mapping``) that points transformers'
    ``"MultiScaleDeformableAttention"`` at msda's layer on "cpu" and "cuda"."""
    repo = _LayerRepository()
    return {LAYER_NAME: {"cpu": repo, "cuda": repo}}


class _LayerRepository:
    """What ``kernels`` needs from a repository: ``layer_name`` and ``load()``
    returning the layer class (no download: the layer ships with msda)."""

    layer_name = LAYER_NAME

    def load(self) -> type:
        return MultiScaleDeformableAttention

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _LayerRepository)

    def __hash__(self) -> int:
        return hash(_LayerRepository)

    def __str__(self) -> str:
        return "msda.integrations.transformers.MultiScaleDeformableAttention"
