"""Straightforward reference implementations of ToMe, EViT and FastV for equality tests.

Written from the algorithms as published (the papers and their official code), as
plain loops over the model's own modules: no hooks, no fico code. They follow each
original's own token layout (ToMe: [unmerged A, B]; EViT: [CLS, kept by score, fused]) and
FastV's keep-set construction.
"""

from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------- vision tower


def _clip_attention(layer, h, size=None):
    """CLIP self-attention computed by hand (eager), with optional ToMe proportional attention.

    Returns the attention output, head-mean-free probabilities (B, H, N, N) and keys (B, H, N, hd).
    """
    attn = layer.self_attn
    b, n, c = h.shape
    heads = attn.num_heads

    def split(x):
        return x.view(b, n, heads, c // heads).transpose(1, 2)

    q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
    logits = (q @ k.transpose(-1, -2)) * attn.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    probs = logits.softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(b, n, c)
    return attn.out_proj(out), probs, k


def bipartite_soft_matching(metric, r, class_token=True):
    """ToMe's matching: returns merge(x, mode) for the original [unm, dst] layout."""
    protected = int(class_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return lambda x, mode="mean": x
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a, b = metric[..., ::2, :], metric[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        if class_token:
            scores[..., 0, :] = -math.inf
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
        unm_idx = edge_idx[..., r:, :]
        src_idx = edge_idx[..., :r, :]
        dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1)[0]

    def merge(x, mode="mean"):
        src, dst = x[..., ::2, :], x[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
        return torch.cat([unm, dst], dim=1)

    return merge


def merge_wavg(merge, x, size=None):
    if size is None:
        size = torch.ones_like(x[..., 0, None])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def tome_hidden_states(tower, pixel_values, r_per_layer, prop_attn=True):
    """hidden_states of the CLIP tower under the original ToMe (index i = input of layer i)."""
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    size = None
    states = [x]
    for layer, r in zip(tower.encoder.layers, r_per_layer):
        out, _, k = _clip_attention(layer, layer.layer_norm1(x), size if prop_attn else None)
        x = x + out
        if r > 0:
            merge = bipartite_soft_matching(k.mean(1), r, class_token=True)
            x, size = merge_wavg(merge, x, size)
        x = x + layer.mlp(layer.layer_norm2(x))
        states.append(x)
    return states


def evit_hidden_states(tower, pixel_values, keep_rate, layers, fuse=True):
    """hidden_states of the CLIP tower under the original EViT."""
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    states = [x]
    for index, layer in enumerate(tower.encoder.layers):
        out, probs, _ = _clip_attention(layer, layer.layer_norm1(x))
        x = x + out
        if index in layers:
            n = x.shape[1]
            left = math.ceil(keep_rate * (n - 1))
            if left < n - 1:
                cls_attn = probs[:, :, 0, 1:].mean(dim=1)
                _, idx = torch.topk(cls_attn, left, dim=1, largest=True, sorted=True)
                kept = x[:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
                parts = [x[:, :1], kept]
                if fuse:
                    mask = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
                    compl = mask.nonzero()[:, 1].view(x.shape[0], n - 1 - left)
                    non_topk = x[:, 1:].gather(1, compl[..., None].expand(-1, -1, x.shape[-1]))
                    weights = cls_attn.gather(1, compl)
                    parts.append((non_topk * weights[..., None]).sum(dim=1, keepdim=True))
                x = torch.cat(parts, dim=1)
        x = x + layer.mlp(layer.layer_norm2(x))
        states.append(x)
    return states


def projected_features(model, states):
    """What LLaVA's projector receives from reference hidden states, per image."""
    feature = states[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
        feature = feature[:, 1:]
    return model.model.multi_modal_projector(feature)


def assert_same_token_set(actual, expected, atol=1e-6):
    """Rows of ``actual`` and ``expected`` (N, D) are the same multiset (up to ``atol``)."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    distance = torch.cdist(actual.double(), expected.double())
    nearest = distance.argmin(dim=1)
    assert nearest.unique().numel() == expected.shape[0], "rows do not pair up one-to-one"
    assert (actual - expected[nearest]).abs().max().item() <= atol


# ----------------------------------------------------------------------------- language model


def llm_inputs(model, input_ids, pixel_values):
    """The LLM's input embeddings (image features in the placeholders) and the placeholder mask."""
    embeds = model.get_input_embeddings()(input_ids)
    features = torch.cat(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    image = input_ids == model.config.image_token_id
    return embeds.masked_scatter(image[..., None], features.to(embeds.dtype)), image


def _causal_padding_mask(keep, real, dtype):
    """Additive mask for kept original indices ``keep`` (B, L): causal by original index, pads masked."""
    allowed = (keep[:, None, :] <= keep[:, :, None]) & torch.gather(real, 1, keep)[:, None, :]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _last_row_attention(layer, hidden, position_embeddings, mask, last):
    """Head-mean softmax attention of query row ``last`` (B,) in decoder ``layer``, by hand."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    b, n, _ = h.shape
    q = attn.q_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, attn.num_key_value_groups)
    logits = (q @ k.transpose(-1, -2)) * attn.scaling + mask
    probs = logits.softmax(-1).mean(1)  # (B, N, N)
    return probs[torch.arange(b), last]


def fastv_logits(model, input_ids, attention_mask, pixel_values, k, ratio, position_ids=None, replay=None):
    """Logits (B, L', V) of LLaVA under the original FastV, computed layer by layer.

    Args:
        position_ids: RoPE positions; default ``arange`` (what ``model(**inputs)`` uses).
        replay: ``(keep, prompt_length)`` to replay a selection made at prefill: ``keep``
            holds the original indices kept among the first ``prompt_length`` tokens, and all
            later (generated) tokens are kept. By default the selection is made here, per
            sample, from layer k-1's last-row attention.
    Returns:
        (logits, keep) with keep the original indices of the tokens after layer k.
    """
    lm = model.model.language_model
    embeds, image = llm_inputs(model, input_ids, pixel_values)
    b, n = input_ids.shape
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if position_ids is None:
        position_ids = torch.arange(n)[None].expand(b, n)
    full = torch.arange(n)[None].expand(b, n)
    mask = _causal_padding_mask(full, real, embeds.dtype)
    cos_sin = lm.rotary_emb(embeds, position_ids)
    hidden = embeds
    keep = full
    previous_input = None  # the input of layer k-1, whose attention FastV ranks by
    for index, layer in enumerate(lm.layers):
        if index == k:
            if replay is None:
                last = n - 1 - torch.flip(real, [1]).int().argmax(1)
                scores = _last_row_attention(lm.layers[k - 1], previous_input, cos_sin, mask, last)
                keep = []
                for i in range(b):
                    visual = image[i].nonzero()[:, 0]
                    n_keep = visual.numel() - round(ratio * visual.numel())
                    top = visual[scores[i, visual].topk(n_keep).indices]
                    keep.append(torch.cat([(~image[i]).nonzero()[:, 0], top]).sort().values)
                keep = torch.stack(keep)
            else:
                prompt_keep, prompt_length = replay
                tail = torch.arange(prompt_length, n)[None].expand(b, -1)
                keep = torch.cat([prompt_keep, tail], dim=1)
            hidden = hidden.gather(1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
            cos_sin = lm.rotary_emb(hidden, position_ids.gather(1, keep))
            mask = _causal_padding_mask(keep, real, embeds.dtype)
        previous_input = hidden
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin,
                       position_ids=torch.arange(hidden.shape[1])[None])
    logits = model.lm_head(lm.norm(hidden))
    return logits, keep
