"""Replay a prefill's token counts through the vanilla model's own modules, layer by layer.

A reduced prefill's measured speedup can fall short of its FLOPs speedup for two reasons:
time fico spends outside the model's matrix products (stages, gathers, hooks), or a machine
that runs the same products less efficiently on fewer tokens (small matrices). The replay
separates them: it times the unmodified modules of the model (CLIP attention and MLP
halves, decoder layers, patch embedding, projector, final norm and one lm_head row) on
random inputs of exactly the per-layer token counts a run recorded, with no fico code
involved; a LLaVA-NeXT image's tower passes (base image and crops) run as one batch, as the
model runs them. ``replay(unreduced) / replay(reduced)`` is the speedup an implementation without
any overhead would reach on this machine with those counts; fico's measured speedup divided
by it is fico's own efficiency.

Used by ``fico bench --replay``.
"""

from __future__ import annotations

import time

import torch

from ..cost.model import TokenCounts


def _timed(fn) -> float:
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def replay_seconds(model, counts: TokenCounts, seed: int = 0) -> float:
    """Seconds the vanilla modules of ``model`` take on ``counts`` (one sample, no fico)."""
    if hasattr(model.model, "visual"):
        return native_replay_seconds(model, counts, seed)
    g = torch.Generator().manual_seed(seed)
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device
    vision_tower = model.model.vision_tower
    vision_width = model.config.vision_config.hidden_size

    def randn(n: int, width: int, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, n, width, generator=g).to(device, dtype)

    passes, side = counts.vision_passes, model.config.vision_config.image_size
    pixels = torch.randn(passes, 3, side, side, generator=g).to(device, dtype)
    total = _timed(lambda: vision_tower.pre_layrnorm(vision_tower.embeddings(pixels)))
    for layer, n_in, n_out in zip(vision_tower.encoder.layers, counts.vision_in, counts.vision_out):
        x_in, x_out = randn(n_in, vision_width, passes), randn(n_out, vision_width, passes)
        total += _timed(lambda: x_in + layer.self_attn(hidden_states=layer.layer_norm1(x_in), attention_mask=None)[0])
        total += _timed(lambda: x_out + layer.mlp(layer.layer_norm2(x_out)))
    features = randn(counts.projected, vision_width)
    total += _timed(lambda: model.model.multi_modal_projector(features))
    return total + _decoder_seconds(model, counts, randn)


def native_replay_seconds(model, counts: TokenCounts, seed: int = 0) -> float:
    """A native-resolution model (Qwen-VL): its whole tower and merger on the image's patches
    (no site reduces inside it), then the decoder layers on ``counts`` and one lm_head row."""
    g = torch.Generator().manual_seed(seed)
    parameter = next(model.parameters())
    dtype, device = parameter.dtype, parameter.device

    def randn(n: int, width: int, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, n, width, generator=g).to(device, dtype)

    vision = model.config.vision_config
    patch, merge = vision.patch_size, vision.spatial_merge_size
    h, w = (side // patch for side in counts.image_size)
    h, w = h - h % merge, w - w % merge
    pixels = randn(h * w, 3 * vision.temporal_patch_size * patch * patch)[0]
    grid = torch.tensor([[1, h, w]], device=device)
    total = _timed(lambda: model.model.visual(pixels, grid_thw=grid))
    return total + _decoder_seconds(model, counts, randn)


def _decoder_seconds(model, counts: TokenCounts, randn) -> float:
    """The decoder layers on ``counts.llm`` tokens (an ``llm_mid`` step's layer: its attention
    half on those, its MLP half on ``counts.llm_mlp``), then the final norm and one lm_head row;
    ``randn(n, width)`` gives random hidden states."""
    text, width = model.model.language_model, model.config.text_config.hidden_size
    total = 0.0
    for layer, n, m in zip(text.layers, counts.llm, counts.llm_mlp):
        hidden, after = randn(n, width), randn(m, width)
        positions = torch.arange(n, device=hidden.device)[None]
        rope = text.rotary_emb(hidden, positions)  # computed once per forward by the model too
        if m == n:
            total += _timed(lambda: layer(hidden, attention_mask=None, position_ids=positions,
                                          position_embeddings=rope))
            continue
        total += _timed(lambda: hidden + layer.self_attn(hidden_states=layer.input_layernorm(hidden),
                                                         attention_mask=None, position_ids=positions,
                                                         position_embeddings=rope)[0])
        total += _timed(lambda: after + layer.mlp(layer.post_attention_layernorm(after)))
    last = randn(1, width)
    return total + _timed(lambda: model.lm_head(text.norm(last)))
