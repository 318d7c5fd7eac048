"""Analytic prefill cost of a model under a token schedule: FLOPs, KV cache, memory.

LLaVA-1.5 and LLaVA-NeXT here (:class:`ModelSpec`); the native-resolution Qwen-VL families in
:mod:`fico.cost.native`, through the same functions.

LLaVA-NeXT (a spec with ``grid_pinpoints``) encodes an image in several tower passes (the base
image and its anyres crops) and gives the language model its packed tokens (base cells,
unpadded high-resolution cells and one newline per row): both depend on the image's size.

Everything is computed from the architecture numbers alone (no weights), for the token
counts a recipe's plan produces (or that a run recorded). Two named conventions:

``llm-viewer`` (the FiCoCo paper's, via LLM-Viewer; ``docs/cost.md``)
    LLM decoder only, 2 FLOPs per multiply-add, per layer with P tokens, hidden D, FFN H,
    heads h and key/value width D_kv:
    ``2PD^2 (q) + 4PD D_kv (k, v) + 2PD^2 (o) + 6PDH (SwiGLU, 3 matrices) + 4P^2 D (scores
    and weighted sum, full square) + 5hP^2 (softmax) + 18PD (2 RMSNorms, 2 residual adds,
    activation)``, plus one lm_head row ``2 D V``. The vision tower and projector are not
    counted.
``full``
    Vision tower + projector + LLM, matrix multiplications only (what
    ``torch.utils.flop_counter.FlopCounterMode`` counts): patch convolution, each CLIP layer
    (q/k/v/o and scores on the tokens entering it, MLP on the tokens leaving its step; all
    layers run, including those after the feature layer), the projector on the features,
    each decoder layer (as above without softmax/norm terms) and the last position's lm_head.
``mac2``, ``mac3`` (FastV's and DivPrune's; PyramidDrop's and SparseVLM's)
    One per multiply-accumulate, decoder layers only, no lm_head: ``2PD^2 + 2PD D_kv`` (q, o;
    k, v: the papers' ``4PD^2`` without GQA) ``+ 2P^2 D`` (scores and weighted sum) ``+ 2PDH``
    (a 2-matrix FFN, ``mac2``) or ``+ 3PDH`` (SwiGLU, ``mac3``). ``llm-viewer`` is twice
    ``mac3`` plus its small softmax/norm terms and the lm_head row.
``mac2-image``, ``mac3-image`` (PyramidDrop's tables)
    The same, counting the image tokens of each layer only (text not counted).

KV cache: ``2 (K and V) x sum over layers of (tokens x D_kv) x bytes``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelNotFoundError, RecipeError
from ..models import DTYPE_BYTES, parse_dtype
from ..recipe.plan import Geometry, RecipePlan, plan_recipe
from .conventions import CONVENTIONS, MAC_CONVENTIONS
from .native import NATIVE_SPECS, NativeSpec, is_native_config, native_spec_from_config, pixel_range


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers of a LLaVA model (CLIP vision tower + projector + Llama LM)."""

    name: str
    image_size: int
    patch_size: int
    vision_layers: int
    vision_hidden: int
    vision_ffn: int
    vision_heads: int
    feature_layer: int
    drops_cls: bool
    llm_layers: int
    llm_hidden: int
    llm_ffn: int
    llm_heads: int
    llm_kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    #: LLaVA-NeXT's anyres resolutions (height, width in pixels); empty: one pass per image
    grid_pinpoints: tuple[tuple[int, int], ...] = ()

    #: ``fico cost``'s convention unless told: the paper's LLM-only count (the tower is ~5%)
    default_convention = "llm-viewer"

    @property
    def depends_on_image_size(self) -> bool:
        """Whether an image's token count depends on its size (``fico cost --image-size``)."""
        return bool(self.grid_pinpoints)

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def kv_width(self) -> int:
        return self.llm_kv_heads * (self.llm_hidden // self.llm_heads)

    def image(self, image_size=None) -> tuple[int, int, tuple | None]:
        """``(tower passes, visual tokens reaching the LLM, grids)`` of one image of ``image_size``
        (height, width): one pass of every patch, or LLaVA-NeXT's anyres count (default: its
        largest resolution, the most tokens)."""
        if not self.grid_pinpoints:
            return 1, self.patches, None
        from ..adapters.families.anyres import anyres_grids, anyres_tokens

        def counts(size):
            passes, _, grids = anyres_grids(size, self.grid_pinpoints, self.image_size, self.patch_size)
            return passes, anyres_tokens(grids), grids

        if image_size is None:
            return max((counts(size) for size in self.grid_pinpoints), key=lambda c: c[1])
        return counts(image_size)

    def geometry(self, image_size=None) -> Geometry:
        index = self.feature_layer if self.feature_layer >= 0 else self.vision_layers + 1 + self.feature_layer
        if not self.grid_pinpoints:
            return Geometry(self.vision_layers, self.patches + 1, index, self.drops_cls, self.llm_layers)
        _, tokens, grids = self.image(image_size)
        return Geometry(self.vision_layers, self.patches + 1, index, self.drops_cls, self.llm_layers,
                        image_tokens=tokens, image_grids=grids)

    def vision_entries(self, counts: "TokenCounts") -> list[dict]:
        """Per-layer FLOPs of the patch embedding, each CLIP layer (on the tokens its step left)
        and the projector (``full`` convention)."""
        passes = counts.vision_passes  # each tower pass (LLaVA-NeXT: base image and crops) costs the same
        conv = passes * 2.0 * self.patches * 3 * self.patch_size ** 2 * self.vision_hidden
        entries = [{"site": "vision", "layer": "patch_embedding", "tokens": self.patches, "passes": passes,
                    "flops": conv}]
        for layer, (n_in, n_out) in enumerate(zip(counts.vision_in, counts.vision_out)):
            entries.append({"site": "vision", "layer": layer, "tokens": n_in, "tokens_after_step": n_out,
                            "passes": passes, "flops": passes * vision_layer_flops(self, n_in, n_out)})
        projector = 2.0 * counts.projected * self.llm_hidden * (self.vision_hidden + self.llm_hidden)
        entries.append({"site": "projector", "layer": 0, "tokens": counts.projected, "flops": projector})
        return entries

    def parameters(self) -> dict[str, int]:
        """Parameter counts by part (weights and biases, as the HF modules hold them)."""
        dv, fv, dl, fl = self.vision_hidden, self.vision_ffn, self.llm_hidden, self.llm_ffn
        vision_layer = 4 * (dv * dv + dv) + (dv * fv + fv) + (fv * dv + dv) + 4 * dv
        vision = (3 * self.patch_size ** 2 * dv + dv + (self.patches + 1) * dv + 2 * dv  # patch, [CLS], pos, pre-LN
                  + self.vision_layers * vision_layer + 2 * dv)  # post-LN
        projector = dv * dl + dl + dl * dl + dl
        llm_layer = 2 * dl * dl + 2 * dl * self.kv_width + 3 * dl * fl + 2 * dl
        embed = self.vocab * dl
        llm = embed + self.llm_layers * llm_layer + dl
        head = 0 if self.tied_embeddings else self.vocab * dl
        return {"vision": vision, "projector": projector, "llm": llm, "lm_head": head}


BUILTIN_SPECS = {
    # CLIP ViT-L/14-336 + Vicuna-7B / -13B, as published in llava-hf/llava-1.5-{7b,13b}-hf
    "llava-1.5-7b": ModelSpec("llava-1.5-7b", 336, 14, 24, 1024, 4096, 16, -2, True,
                              32, 4096, 11008, 32, 32, 32064),
    "llava-1.5-13b": ModelSpec("llava-1.5-13b", 336, 14, 24, 1024, 4096, 16, -2, True,
                               40, 5120, 13824, 40, 40, 32064),
    # the same towers with anyres, as published in llava-hf/llava-v1.6-vicuna-7b-hf
    "llava-next-7b": ModelSpec("llava-next-7b", 336, 14, 24, 1024, 4096, 16, -2, True,
                               32, 4096, 11008, 32, 32, 32064,
                               grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))),
}


def spec_from_config(config, name: str = "config", pixels: dict[str, int] | None = None) -> "ModelSpec | NativeSpec":
    """A :class:`ModelSpec` from a ``transformers.LlavaConfig`` or ``LlavaNextConfig`` (whose class
    declares ``image_grid_pinpoints``), a :class:`NativeSpec` from a Qwen-VL config (``pixels``:
    its image processor's range, :func:`fico.cost.native.pixel_range`)."""
    if is_native_config(config):
        return native_spec_from_config(config, name, pixels)
    vision, text = config.vision_config, config.text_config
    feature = config.vision_feature_layer
    if not isinstance(feature, int):
        raise RecipeError(f"{name}: the cost model needs one vision_feature_layer, got {feature}")
    return ModelSpec(
        name=name, image_size=vision.image_size, patch_size=vision.patch_size,
        vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size,
        vision_ffn=vision.intermediate_size, vision_heads=vision.num_attention_heads,
        feature_layer=feature, drops_cls=config.vision_feature_select_strategy == "default",
        llm_layers=text.num_hidden_layers, llm_hidden=text.hidden_size, llm_ffn=text.intermediate_size,
        llm_heads=text.num_attention_heads,
        llm_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        vocab=text.vocab_size, tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        grid_pinpoints=tuple(tuple(p) for p in getattr(config, "image_grid_pinpoints", None) or ()),
    )


def model_spec(model: str | Path | Any) -> ModelSpec:
    """``llava-1.5-7b``, ``llava-1.5-13b``, ``llava-next-7b``, ``qwen2-vl-7b``, ``qwen2.5-vl-7b``,
    ``qwen3-vl-8b``, ``embedded``, ``embedded-next``, ``embedded-qwen2-vl`` (and the other two),
    ``toy``, a local checkpoint/config directory, a config or a model."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, NativeSpec):
        return model
    if hasattr(model, "config") and hasattr(model.config, "vision_config"):
        return spec_from_config(model.config, getattr(model, "name_or_path", "") or type(model).__name__)
    if hasattr(model, "vision_config"):
        return spec_from_config(model)
    key = str(model)
    if key in BUILTIN_SPECS:
        return BUILTIN_SPECS[key]
    if key in NATIVE_SPECS:
        return NATIVE_SPECS[key]
    if key.startswith("embedded-qwen"):
        from .. import embedded_qwen

        family = key.removeprefix("embedded-")
        if family in embedded_qwen.FAMILIES:
            size = embedded_qwen.build_image_processor(family).size
            return spec_from_config(embedded_qwen.build_config(family), key,
                                    {"min_pixels": size.shortest_edge, "max_pixels": size.longest_edge})
    if key == "embedded":
        from .. import embedded

        return spec_from_config(embedded.build_config(), "embedded")
    if key == "embedded-next":
        from .. import embedded_next

        return spec_from_config(embedded_next.build_config(), "embedded-next")
    if key == "toy":
        from ..toy.model import build_config

        return spec_from_config(build_config(), "toy")
    path = Path(key)
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        processor = path / "preprocessor_config.json"
        pixels = pixel_range(json.loads(processor.read_text())) if processor.is_file() else None
        return spec_from_config(AutoConfig.from_pretrained(path, local_files_only=True), key, pixels)
    from ..models import model_source

    names = {**{name: "published architecture" for name in (*BUILTIN_SPECS, *NATIVE_SPECS)},
             "embedded": "fico's random tiny model", "embedded-next": "fico's random tiny LLaVA-NeXT",
             **{f"embedded-{family}": "fico's random tiny " + family for family in ("qwen2-vl", "qwen2.5-vl",
                                                                                    "qwen3-vl")},
             "toy": "fico-toy"}
    model_source(key, names, label="model")  # raises, naming the built-in models and any close match
    raise ModelNotFoundError(f"unknown model {key!r}")  # pragma: no cover - model_source raised


@dataclass
class TokenCounts:
    """Per-layer token counts of one prefill (one sample, one image).

    ``vision_in[i]`` enters CLIP layer i (its attention), ``vision_out[i]`` leaves its step
    (its MLP), in each of ``vision_passes`` tower passes; ``projected`` enters the projector
    (all passes) and ``features`` the language model;
    ``llm[i]`` is what decoder layer i's attention runs on (also its KV-cache length) and
    ``llm_mlp[i]`` what its MLP runs on (fewer after an ``llm_mid`` step).
    """

    vision_in: list[int]
    vision_out: list[int]
    features: int
    llm: list[int]
    text_tokens: int
    llm_mlp: list[int] | None = None
    projected: int | None = None
    vision_passes: int = 1
    #: the image's (height, width) where its tower's cost depends on it (a native-resolution tower)
    image_size: tuple[int, int] | None = None

    def __post_init__(self):
        if self.llm_mlp is None:
            self.llm_mlp = list(self.llm)
        if self.projected is None:
            self.projected = self.features

    @classmethod
    def unreduced(cls, spec: "ModelSpec", text_tokens: int, image_size=None) -> "TokenCounts":
        """Every layer on every token (of an image of ``image_size`` where the count depends on it)."""
        passes, features, _ = spec.image(image_size)
        if isinstance(spec, NativeSpec):
            h, w = spec.patch_grid(image_size)
            vision = [h * w] * spec.vision_layers
            return cls(vision, list(vision), features, [features + text_tokens] * spec.llm_layers, text_tokens,
                       image_size=image_size)
        vision = [spec.patches + 1] * spec.vision_layers
        return cls(vision, list(vision), features, [features + text_tokens] * spec.llm_layers, text_tokens,
                   projected=passes * spec.patches, vision_passes=passes)

    @classmethod
    def from_plan(cls, plan: RecipePlan, text_tokens: int, passes: int = 1) -> "TokenCounts":
        if plan.features is None or (passes > 1 and plan.pass_features is None):
            raise RecipeError("the recipe chooses its token count per image (an adaptive step), so its cost "
                              "depends on the image: `fico run` prints the cost of what ran on one")
        llm = [text_tokens + n for n in plan.llm.attention]
        llm_mlp = [text_tokens + n for n in plan.llm.mlp]
        projected = plan.pre_llm.tokens_in if plan.pre_llm is not None else plan.features
        if plan.pass_features is not None:
            projected = passes * plan.pass_features
        return cls(plan.vision.attention, plan.vision.mlp, plan.features, llm, text_tokens, llm_mlp, projected,
                   passes)

    @classmethod
    def from_trace(cls, trace, spec: ModelSpec, image_size=None) -> "TokenCounts":
        """What a run recorded (``run.trace``), for the cost of what actually ran (first image,
        of ``image_size`` where its count depends on it)."""
        if isinstance(spec, NativeSpec):
            return cls._native_from_trace(trace, spec, image_size)
        steps = {s.layer: s for s in trace.steps if s.site == "vision"}
        vision_in = list(trace.vision) or [spec.patches + 1] * spec.vision_layers
        vision_out = [steps[i].tokens_out if i in steps else n for i, n in enumerate(vision_in)]
        features = trace.vision_features if trace.vision_features is not None else spec.patches
        features = features[0] if isinstance(features, list) else features
        pre = [s for s in trace.steps if s.site == "pre_llm"]
        projected = pre[0].tokens_in if pre else features
        passes = trace.vision_passes[0] if isinstance(trace.vision_passes, list) else (trace.vision_passes or 1)
        if trace.vision_passes is not None:  # the projector ran on every pass's features
            at_feature = ([n for n in vision_out] + [vision_out[-1]])[spec.geometry().feature_index - 1]
            projected = passes * (at_feature - (1 if spec.drops_cls else 0))
        llm_first = trace.llm[0] if trace.llm else features
        llm_steps = {s.layer: s for s in trace.steps if s.site == "llm"}
        mid_steps = {s.layer: s for s in trace.steps if s.site == "llm_mid"}
        first_in = llm_steps[0].tokens_in if 0 in llm_steps else llm_first
        llm_mlp = [mid_steps[i].tokens_out if i in mid_steps else n for i, n in enumerate(trace.llm)]
        return cls(vision_in, vision_out, features, list(trace.llm), first_in - features, llm_mlp, projected,
                   passes)


    @classmethod
    def _native_from_trace(cls, trace, spec: NativeSpec, image_size) -> "TokenCounts":
        h, w = spec.patch_grid(image_size)
        unreduced = h * w // spec.merge ** 2
        features = trace.vision_features if trace.vision_features is not None else unreduced
        features = features[0] if isinstance(features, list) else features
        mid_steps = {s.layer: s for s in trace.steps if s.site == "llm_mid"}
        llm_mlp = [mid_steps[i].tokens_out if i in mid_steps else n for i, n in enumerate(trace.llm)]
        text = (trace.llm[0] if trace.llm else features) - features
        return cls([h * w] * spec.vision_layers, [h * w] * spec.vision_layers, features, list(trace.llm), text,
                   llm_mlp, unreduced, image_size=image_size)


@dataclass
class CostReport:
    model: str
    convention: str
    dtype: str
    text_tokens: int | list[int]
    tflops: float
    kv_cache_mb: float
    weights_gb: float
    activations_gb: float
    memory_gb: float
    tokens: dict
    per_layer: list[dict] = field(default_factory=list)
    recipe: str | None = None
    schedule: dict | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def llm_layer_flops(spec: ModelSpec, p: int, convention: str, mlp: int | None = None) -> float:
    """One decoder layer whose attention runs on ``p`` tokens and its MLP on ``mlp`` (default p)."""
    d, h, kv = spec.llm_hidden, spec.llm_ffn, spec.kv_width
    m = p if mlp is None else mlp
    if convention in MAC_CONVENTIONS:
        matrices = MAC_CONVENTIONS[convention][0]
        return float(p * d * d + m * d * d + 2 * p * d * kv + 2 * p * p * d + matrices * m * d * h)
    flops = 2 * p * d * d + 2 * m * d * d + 2 * 2 * p * d * kv + 2 * 3 * m * d * h + 2 * 2 * p * p * d
    if convention == "llm-viewer":
        flops += 5 * spec.llm_heads * p * p + 8 * p * d + 10 * m * d  # norm + add before the MLP, norm + add + act after
    return float(flops)


def vision_layer_flops(spec: ModelSpec, n_in: int, n_out: int) -> float:
    d, f = spec.vision_hidden, spec.vision_ffn
    return float(2 * 4 * n_in * d * d + 2 * 2 * n_in * n_in * d + 2 * 2 * n_out * d * f)


def prefill_cost(spec: ModelSpec, counts: TokenCounts, convention: str = "llm-viewer",
                 dtype: str = "float16") -> CostReport:
    """FLOPs, KV cache and memory of one prefill with the given token counts."""
    if convention not in CONVENTIONS:
        raise RecipeError(f"unknown cost convention {convention!r}; known: {', '.join(CONVENTIONS)}")
    try:
        dtype = parse_dtype(dtype, quantized=True)
    except ValueError as error:
        raise RecipeError(str(error)) from None
    per_layer = []
    total = 0.0
    if convention == "full":
        entries = spec.vision_entries(counts)
        per_layer += entries
        total += sum(entry["flops"] for entry in entries)
    image_only = MAC_CONVENTIONS.get(convention, (0, False))[1]
    for layer, (p, m) in enumerate(zip(counts.llm, counts.llm_mlp)):
        text = counts.text_tokens if image_only else 0
        flops = llm_layer_flops(spec, p - text, convention, m - text)
        entry = {"site": "llm", "layer": layer, "tokens": p - text, "flops": flops}
        if m != p:
            entry["tokens_after_step"] = m - text
        per_layer.append(entry)
        total += flops
    if convention not in MAC_CONVENTIONS:
        head = 2.0 * spec.llm_hidden * spec.vocab
        per_layer.append({"site": "lm_head", "layer": 0, "tokens": 1, "flops": head})
        total += head

    bytes_per = DTYPE_BYTES[dtype]
    kv_bytes = 2 * sum(counts.llm) * spec.kv_width * bytes_per
    params = spec.parameters()
    weight_params = sum(params.values()) if convention == "full" else params["llm"] + params["lm_head"]
    weights = weight_params * bytes_per
    # Peak live activations of the largest decoder layer under SDPA (no attention matrix):
    # residual + normed input + q, k, v (P x D each) and the SwiGLU gate and up (P x H each).
    p_max = max(counts.llm) if counts.llm else 0
    activations = (5 * p_max * spec.llm_hidden + 2 * p_max * spec.llm_ffn) * bytes_per
    return CostReport(
        model=spec.name, convention=convention, dtype=dtype, text_tokens=counts.text_tokens,
        tflops=total / 1e12, kv_cache_mb=kv_bytes / 1e6, weights_gb=weights / 1e9,
        activations_gb=activations / 1e9, memory_gb=(weights + kv_bytes + activations) / 1e9,
        tokens={"vision": counts.vision_in, "vision_after_step": counts.vision_out, "features": counts.features,
                "llm": counts.llm},
        per_layer=per_layer,
    )


def recipe_cost(model, recipe=None, text_tokens: int | list[int] = 60, convention: str = "llm-viewer",
                dtype: str = "float16", image_size=None) -> CostReport:
    """Cost of ``recipe`` (None: the unreduced model) on ``model`` (see :func:`model_spec`), for
    one image of ``image_size`` (height, width) where the model's count depends on it
    (LLaVA-NeXT; default: its largest resolution).

    ``text_tokens`` may be a list (DivPrune's per-benchmark text lengths): the report then
    averages FLOPs, KV cache and memory over those lengths.

    >>> round(recipe_cost("llava-1.5-7b", text_tokens=60).tflops, 2)
    8.45
    >>> round(recipe_cost("llava-1.5-7b", text_tokens=60, convention="mac3-image").tflops, 2)
    3.82
    """
    spec = model_spec(model)
    if isinstance(text_tokens, (list, tuple)):
        if not text_tokens:
            raise RecipeError("text_tokens: an empty list")
        reports = [recipe_cost(spec, recipe, t, convention, dtype, image_size) for t in text_tokens]
        mean = lambda key: sum(getattr(r, key) for r in reports) / len(reports)
        first = reports[0]
        return CostReport(model=first.model, convention=convention, dtype=first.dtype, text_tokens=list(text_tokens),
                          tflops=mean("tflops"), kv_cache_mb=mean("kv_cache_mb"), weights_gb=first.weights_gb,
                          activations_gb=mean("activations_gb"), memory_gb=mean("memory_gb"), tokens=first.tokens,
                          per_layer=[], recipe=first.recipe, schedule=first.schedule)
    if isinstance(text_tokens, bool) or not isinstance(text_tokens, int) or text_tokens < 1:
        raise RecipeError(f"text_tokens must be an integer >= 1 (or a list of them), got {text_tokens!r}")
    if recipe is None:
        return prefill_cost(spec, TokenCounts.unreduced(spec, text_tokens, image_size), convention, dtype)
    plan = plan_recipe(recipe, spec.geometry(image_size))
    passes = spec.image(image_size)[0]
    counts = TokenCounts.from_plan(plan, text_tokens, passes)
    counts.image_size = image_size
    report = prefill_cost(spec, counts, convention, dtype)
    report.recipe = recipe.name
    report.schedule = recipe.knobs
    return report


def llava_config(spec: ModelSpec):
    """A ``transformers.LlavaConfig`` with ``spec``'s architecture (for meta-device checks)."""
    from transformers import LlavaConfig

    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=spec.vision_hidden,
                           image_size=spec.image_size, intermediate_size=spec.vision_ffn,
                           num_attention_heads=spec.vision_heads, num_hidden_layers=spec.vision_layers,
                           patch_size=spec.patch_size, projection_dim=768),
        text_config=dict(model_type="llama", hidden_size=spec.llm_hidden, intermediate_size=spec.llm_ffn,
                         num_hidden_layers=spec.llm_layers, num_attention_heads=spec.llm_heads,
                         num_key_value_heads=spec.llm_kv_heads, max_position_embeddings=4096,
                         vocab_size=spec.vocab, pad_token_id=spec.vocab - 1),
        image_token_id=spec.vocab - 2, projector_hidden_act="gelu", vision_feature_layer=spec.feature_layer,
        vision_feature_select_strategy="default" if spec.drops_cls else "full",
        image_seq_length=spec.patches, tie_word_embeddings=spec.tied_embeddings, pad_token_id=spec.vocab - 1,
    )
