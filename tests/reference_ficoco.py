"""Straightforward FiCoCo-V / FiCoCo-L following docs/ficoco-spec.md.

One image or sample at a time, Python loops over windows, rows and targets; no fico code.
"""

from __future__ import annotations

import torch

from reference import _causal_padding_mask, _clip_attention, llm_inputs


def _penalise(score, pos, grid_side, window, c):
    """Local penalty on {token: score} with original grid cells pos[token] (patch index)."""
    windows = {}
    for token, cell in pos.items():
        row, col = divmod(cell, grid_side)
        windows.setdefault((row // window, col // window), []).append(token)
    for members in windows.values():
        best = max(members, key=lambda t: (score[t], -pos[t]))
        score[best] = score[best] * c if score[best] > 0 else score[best] / c
    return score


def _compress(x, attention_rows, S, T, eps):
    """Self-preserving update of x (N, D) with correlation rows C[i] over T (dict i -> tensor)."""
    num = {j: torch.zeros_like(x[0]) for j in T}
    den = {j: 0.0 for j in T}
    for i in S:
        row = attention_rows[i]
        tau = torch.quantile(row, eps)
        chosen = [(j, row[n]) for n, j in enumerate(T) if row[n] >= tau]
        total = sum(v for _, v in chosen)
        for j, v in chosen:
            num[j] = num[j] + (v / total) * x[i]
            den[j] = den[j] + v / total
    out = x.clone()
    for j in T:
        if den[j] != 0:
            out[j] = (x[j] + num[j]) / (1 + den[j])
    return out


def ficoco_v_states(tower, pixel_values, r, layers, lam=0.35, c=2.0, window=2, eps=0.998):
    """hidden_states of one image (batch of 1) under FiCoCo-V."""
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    pos = list(range(x.shape[1]))  # 0 = [CLS], p = patch p - 1
    side = int((x.shape[1] - 1) ** 0.5)
    states = [x]
    for index, layer in enumerate(tower.encoder.layers):
        out, probs, _ = _clip_attention(layer, layer.layer_norm1(x))
        x = x + out
        if index in layers:
            A = probs.mean(1)[0]
            n = x.shape[1]
            patches = [t for t in range(n) if pos[t] != 0]
            received = A[patches].sum(0) / len(patches)
            score = {t: lam * received[t] - (1 - lam) * A[0, t] for t in patches}
            score = _penalise(score, {t: pos[t] - 1 for t in patches}, side, window, c)
            S = sorted(patches, key=lambda t: (-score[t], pos[t]))[:r]
            T = [t for t in patches if t not in S]
            rows = {i: A[i, T] for i in S}
            merged = _compress(x[0], rows, S, T, eps)
            keep = [t for t in range(n) if t not in S]
            x = merged[keep][None]
            pos = [pos[t] for t in keep]
        x = x + layer.mlp(layer.layer_norm2(x))
        states.append(x)
    return states


def _attention_matrix(layer, hidden, cos_sin, mask):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    b, n, _ = h.shape
    q = attn.q_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *cos_sin)
    logits = (q @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2)) * attn.scaling + mask
    probs = logits.softmax(-1)
    return probs.mean(1)


def ficoco_l_logits(model, input_ids, attention_mask, pixel_values, r, layers, beta=0.6, gamma=0.6, eps=0.998):
    """Logits (B, L', V) under FiCoCo-L, with positions = arange (as model(**inputs))."""
    lm = model.model.language_model
    hidden, image = llm_inputs(model, input_ids, pixel_values)
    b, n = input_ids.shape
    real = attention_mask.bool()
    keep = torch.arange(n)[None].expand(b, n)
    positions = keep
    mask = _causal_padding_mask(keep, real, hidden.dtype)
    cos_sin = lm.rotary_emb(hidden, positions)
    previous = None
    for index, layer in enumerate(lm.layers):
        if index in layers:
            A = _attention_matrix(lm.layers[index - 1], previous, cos_sin, mask)
            new_hidden, new_keep = [], []
            for s in range(b):
                ids = keep[s].tolist()
                vis = [t for t, o in enumerate(ids) if image[s, o] and real[s, o]]
                first = vis[0]
                text = [t for t, o in enumerate(ids) if real[s, o] and not image[s, o] and t > first]
                a = A[s]
                vr = a[vis].sum(0) / len(vis)
                task = a[text].sum(0) / len(text)
                score = {t: beta * vr[t] - (1 - beta) * task[t] for t in vis}
                S = sorted(vis, key=lambda t: (-score[t], ids[t]))[:r]
                T = [t for t in vis if t not in S]
                rows = {}
                from_text = a[text]  # (M, N): text queries' attention
                for i in S:
                    direct = a[i, T] + a[T, i]
                    indirect = (from_text[:, i:i + 1] * from_text[:, T]).sum(0) / len(text)
                    rows[i] = gamma * direct + (1 - gamma) * indirect
                merged = _compress(hidden[s], rows, S, T, eps)
                kept = [t for t in range(len(ids)) if t not in S]
                new_hidden.append(merged[kept])
                new_keep.append(keep[s, kept])
            hidden, keep = torch.stack(new_hidden), torch.stack(new_keep)
            cos_sin = lm.rotary_emb(hidden, keep)
            mask = _causal_padding_mask(keep, real, hidden.dtype)
        previous = hidden
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin,
                       position_ids=torch.arange(hidden.shape[1])[None])
    return model.lm_head(lm.norm(hidden)), keep
