"""Straightforward implementations of the wave-2 methods for equality tests.

Written from the methods' official algorithms as restated for fico (one image or sample at a
time, Python loops where the official code loops, no fico code): what each method hands the
language model, and the language model's logits under the in-decoder methods. Order-sensitive
methods (VisionZip, PruMerge, DART's pivot order) reproduce the order, not only the set.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from reference import _clip_attention, llm_inputs


# ----------------------------------------------------------------------------- vision tower


def clip_run(tower, pixel_values):
    """Per layer: input hidden states, head-mean keys, per-head probabilities, and the q/k
    projections (full width, bias included) of each layer's normed input; plus the outputs."""
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    states, records = [x], []
    for layer in tower.encoder.layers:
        h = layer.layer_norm1(x)
        out, probs, keys = _clip_attention(layer, h)
        records.append({"probs": probs, "keys": keys.mean(1), "q": layer.self_attn.q_proj(h),
                        "k": layer.self_attn.k_proj(h)})
        x = x + out
        x = x + layer.mlp(layer.layer_norm2(x))
        states.append(x)
    return states, records


def feature_layer(model):
    """(index into hidden_states, the layer whose output it is)."""
    index = model.config.vision_feature_layer % (len(model.model.vision_tower.encoder.layers) + 1)
    return index, index - 1


def fastervlm_features(model, pixel_values, keep):
    """FasterVLM / HiRED: the top-``keep`` patches by [CLS] attention (head-mean), spatial order."""
    states, records = clip_run(model.model.vision_tower, pixel_values)
    index, layer = feature_layer(model)
    out = []
    for b in range(pixel_values.shape[0]):
        attention = records[layer]["probs"][b, :, 0, 1:].mean(0)
        chosen = torch.topk(attention, keep).indices.sort().values
        out.append(model.model.multi_modal_projector(states[index][b, 1:][chosen]))
    return out


def visionzip_features(model, pixel_values, dominant, contextual):
    """VisionZip's official path: [CLS] + dominant - 1 patches, then contextual target + mean."""
    states, records = clip_run(model.model.vision_tower, pixel_values)
    index, layer = feature_layer(model)
    out = []
    for b in range(pixel_values.shape[0]):
        x = states[index][b]
        n = x.shape[0]
        s = records[layer]["probs"][b, :, 0, 1:].sum(0)  # head-sum, as the official code
        top = (torch.topk(s, dominant - 1).indices + 1).tolist()
        keep_dom = sorted({0, *top})
        rest = [i for i in range(n) if i not in keep_dom]
        m = len(rest)
        step = max(1, m // contextual)
        targets = list(range(0, m, step))[:contextual]
        others = [p for p in range(m) if p not in targets]
        keys = F.normalize(records[layer]["keys"][b, rest], dim=-1)
        groups = {t: [] for t in targets}
        for o in others:
            sims = torch.stack([keys[o] @ keys[t] for t in targets])
            groups[targets[int(sims.argmax())]].append(o)
        contexts = []
        for t in targets:
            members = groups[t]
            total = sum((x[rest[o]] for o in members), torch.zeros_like(x[0]))
            contexts.append(x[rest[t]] + total / max(1, len(members)))
        tokens = torch.cat([x[keep_dom], torch.stack(contexts)])
        out.append(model.model.multi_modal_projector(tokens))
    return out


def vispruner_features(model, pixel_values, keep, important_ratio):
    """VisPruner: important by [CLS] attention, diverse by bipartite duplicate rounds."""
    states, records = clip_run(model.model.vision_tower, pixel_values)
    index, layer = feature_layer(model)
    out = []
    for b in range(pixel_values.shape[0]):
        x = states[index][b, 1:]
        attention = records[layer]["probs"][b, :, 0, 1:].mean(0)
        important = int(keep * important_ratio)
        diverse = keep - important
        order = torch.argsort(attention, descending=True).tolist()
        imp, res = order[:important], order[important:]
        unit = F.normalize(x, dim=-1)
        while True:
            drop = min(8, len(res) - diverse)
            if drop <= 0:
                break
            a_set, b_set = res[0::2], res[1::2]
            scores = [max(float(unit[a] @ unit[bb]) for bb in b_set) for a in a_set]
            ranked = sorted(range(len(a_set)), key=lambda i: -scores[i])
            res = [a_set[i] for i in ranked[drop:]] + b_set
        chosen = sorted(imp + res)
        out.append(model.model.multi_modal_projector(x[chosen]))
    return out


def prumerge_features(model, pixel_values, neighbors=32, plus=False):
    """PruMerge / PruMerge+ (per image): outliers by the IQR fence, kNN merge, extra token."""
    states, records = clip_run(model.model.vision_tower, pixel_values)
    index, _ = feature_layer(model)
    nxt = records[index]  # the layer after the feature layer: its q/k of hidden_states[index]
    out = []
    for b in range(pixel_values.shape[0]):
        x = states[index][b, 1:]
        q, k = nxt["q"][b], nxt["k"][b]
        attn = torch.softmax(q @ k.T * q.shape[-1] ** -0.5, dim=-1)
        a = attn[0, 1:]
        total = a.shape[0]
        q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], dtype=a.dtype))
        ratio = int((a > q3 + 1.5 * (q3 - q1)).sum()) / total
        count = int(total * ratio)
        centres = torch.topk(a, count).indices.tolist()
        if plus:
            step = int(1 / ratio)
            extra = [u for u in range(0, total - 1, int(step / 3)) if u not in centres]
            centres = centres + extra
        pruned = sorted(set(range(total)) - set(centres))
        unit = F.normalize(k[1:], dim=-1)
        merged = []
        for i in centres:
            others = [c for c in centres if c != i] + pruned
            sims = torch.stack([unit[i] @ unit[o] for o in others])
            nb = [others[j] for j in torch.topk(sims, min(neighbors, len(others))).indices.tolist()]
            merged.append(x[i] + sum(a[o] * x[o] for o in nb))
        extra_token = sum((a[j] * x[j] for j in pruned), torch.zeros_like(x[0]))
        out.append(model.model.multi_modal_projector(torch.stack(merged + [extra_token])))
    return out


# ----------------------------------------------------------------------------- before the LLM


def projected(model, pixel_values):
    """Per image: the projector's outputs of the [CLS]-less feature layer (unreduced)."""
    features = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return list(features)


def divprune_features(model, pixel_values, keep):
    """DivPrune: greedy max-min cosine diversity on the projector outputs."""
    out = []
    for x in projected(model, pixel_values):
        unit = F.normalize(x, dim=-1)
        distance = 1 - unit @ unit.T
        first = int(torch.sort(distance, dim=0).values[1].argmax())
        chosen = [first]
        for _ in range(keep - 1):
            score = torch.stack([distance[s] for s in chosen]).min(0).values
            score[chosen] = -1
            chosen.append(int(score.argmax()))
        out.append(x[sorted(chosen)])
    return out


def pool_features(model, pixel_values, kernel):
    """k x k average pooling with stride k of the projector outputs on the patch grid."""
    out = []
    for x in projected(model, pixel_values):
        side = int(math.isqrt(x.shape[0]))
        grid = x.T.reshape(1, x.shape[1], side, side)
        pooled = F.avg_pool2d(grid, kernel, stride=kernel)
        out.append(pooled.reshape(x.shape[1], -1).T)
    return out


def random_features(model, pixel_values, keep, seed):
    """Random pruning with fico's documented rule: one seeded uniform draw per grid cell."""
    out = []
    for x in projected(model, pixel_values):
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(x.shape[0] + 1, generator=generator, dtype=torch.float64)[:-1]
        # the discarded are those with the highest draws: the kept, the lowest
        out.append(x[torch.topk(noise, keep, largest=False).indices.sort().values])
    return out


# ----------------------------------------------------------------------------- the language model


def llm_logits(model, input_ids, features):
    """Logits of the language model on one sample whose image placeholders are cut to the
    given features (one image, no padding): what a pre-LLM method hands the model."""
    image = input_ids[0] == model.config.image_token_id
    first = int(image.nonzero()[0])
    last = int(image.nonzero()[-1])
    ids = torch.cat([input_ids[0, :first], input_ids[0, last + 1:]])
    embeds = model.get_input_embeddings()(ids)
    embeds = torch.cat([embeds[:first], features.to(embeds.dtype), embeds[first:]])[None]
    hidden = model.model.language_model(inputs_embeds=embeds).last_hidden_state
    return model.lm_head(hidden)


# ----------------------------------------------------------------------------- inside the LLM


def _rope(x, cos, sin):
    from transformers.models.llama.modeling_llama import rotate_half

    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _present_mask(real_present, dtype):
    """Additive 4D mask: causal in present order, padding masked."""
    n = real_present.shape[1]
    allowed = torch.ones(n, n, dtype=torch.bool).tril()[None] & real_present[:, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def _attention_probs(layer, hidden, cos, sin, mask):
    """(B, H, N, N) softmax attention of decoder ``layer`` on its input ``hidden``, by hand."""
    from transformers.models.llama.modeling_llama import repeat_kv

    attn = layer.self_attn
    h = layer.input_layernorm(hidden)
    b, n, _ = h.shape
    q = _rope(attn.q_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2), cos, sin)
    k = _rope(attn.k_proj(h).view(b, n, -1, attn.head_dim).transpose(1, 2), cos, sin)
    logits = q @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2) * attn.scaling + mask
    return logits.softmax(-1), k


class Decoder:
    """The language model run layer by layer on one sample (no padding), tokens removable.

    ``index[i]`` is the original index of the i-th token present (-1 for created ones), and
    ``pos[i]`` its RoPE position. Tokens at original index >= ``prompt`` are generated ones:
    always kept, never used to choose (a no-cache recompute of a cached decode).
    """

    def __init__(self, model, input_ids, pixel_values, prompt=None, positions=None):
        self.model, self.lm = model, model.model.language_model
        self.embeds, image = llm_inputs(model, input_ids, pixel_values)
        n = input_ids.shape[1]
        self.prompt = n if prompt is None else prompt
        self.hidden = self.embeds
        self.index = list(range(n))
        self.visual = [bool(v) for v in image[0]]
        self.base = list(range(n)) if positions is None else positions
        self.pos = list(self.base)

    def cos_sin(self):
        x = self.hidden
        return self.lm.rotary_emb(x, torch.tensor([self.pos]))

    def mask(self):
        return _present_mask(torch.ones(1, len(self.index), dtype=torch.bool), self.hidden.dtype)

    def is_visual(self, i):
        return self.index[i] >= 0 and self.visual[self.index[i]] or self.index[i] == -1

    def visual_rows(self):
        return [i for i in range(len(self.index)) if self.is_visual(i) and self.index[i] < self.prompt]

    def text_after_rows(self):
        first = min(i for i in range(len(self.index)) if self.is_visual(i))
        return [i for i in range(first + 1, len(self.index))
                if not self.is_visual(i) and 0 <= self.index[i] < self.prompt]

    def keep(self, rows, renumber=False):
        rows = sorted(rows)
        self.hidden = self.hidden[:, rows]
        self.index = [self.index[r] for r in rows]
        self.pos = self.base[:len(rows)] if renumber else [self.pos[r] for r in rows]

    def run_layer(self, layer, mid=None):
        cos, sin = self.cos_sin()
        mask = self.mask()
        if mid is None:
            self.hidden = layer(self.hidden, attention_mask=mask, position_embeddings=(cos, sin),
                                position_ids=torch.arange(self.hidden.shape[1])[None])
            return
        residual = self.hidden
        h = layer.input_layernorm(self.hidden)
        out, _ = layer.self_attn(hidden_states=h, attention_mask=mask, position_embeddings=(cos, sin),
                                 position_ids=torch.arange(h.shape[1])[None])
        self.hidden = residual + out
        probs, _ = _attention_probs(layer, residual, cos, sin, mask)
        rows = mid(probs)
        if rows is not None:
            self.keep(rows)
        residual = self.hidden
        self.hidden = residual + layer.mlp(layer.post_attention_layernorm(self.hidden))

    def logits(self):
        return self.model.lm_head(self.lm.norm(self.hidden))

    def last_prompt_row(self):
        return max(i for i in range(len(self.index)) if 0 <= self.index[i] < self.prompt)


def pdrop_logits(model, input_ids, pixel_values, layers, ratio, prompt=None, positions=None):
    """PyramidDrop: at each layer of ``layers``, rank with its own q/k of its input."""
    d = Decoder(model, input_ids, pixel_values, prompt, positions)
    total = len(d.visual_rows())
    for index, layer in enumerate(d.lm.layers):
        if index in layers:
            stage = layers.index(index)
            cos, sin = d.cos_sin()
            probs, _ = _attention_probs(layer, d.hidden, cos, sin, d.mask())
            row = probs[0, :, d.last_prompt_row()].mean(0)
            visual = d.visual_rows()
            n_keep = int(total * ratio ** (stage + 1))
            top = [visual[j] for j in torch.topk(row[visual], n_keep).indices.tolist()]
            others = [i for i in range(len(d.index)) if i not in visual]
            d.keep(others + top, renumber=True)
        d.run_layer(layer)
    return d.logits()


def dart_logits(model, input_ids, pixel_values, k, keep, image_pivots=4, text_pivots=4, prompt=None,
                positions=None):
    """DART at layer k: L1 key-norm pivots, then the least similar to each, in set order."""
    from transformers.models.llama.modeling_llama import repeat_kv

    d = Decoder(model, input_ids, pixel_values, prompt, positions)
    for index, layer in enumerate(d.lm.layers):
        if index == k:
            cos, sin = previous
            _, keys = _attention_probs(d.lm.layers[k - 1], previous_input, cos, sin, d.mask())
            keys = repeat_kv(keys, d.lm.layers[k - 1].self_attn.num_key_value_groups)
            norms = keys.abs().sum(dim=(1, 3))[0]
            unit = F.normalize(d.lm.norm(d.hidden)[0], dim=-1)
            visual = d.visual_rows()
            text = d.text_after_rows()
            img_piv = [visual[j] for j in torch.topk(norms[visual], image_pivots).indices.tolist()]
            txt_piv = [text[j] for j in torch.topk(norms[text], min(text_pivots, len(text))).indices.tolist()]
            per = keep // (image_pivots + text_pivots)
            chosen = set(img_piv + txt_piv)
            valid = [v for v in visual if v not in img_piv]
            kept = list(img_piv)
            for pivot in list(chosen):
                sims = torch.stack([unit[pivot] @ unit[v] for v in valid])
                new = [valid[j] for j in torch.topk(sims, min(per, len(valid)), largest=False).indices.tolist()]
                kept += new
                valid = [v for v in valid if v not in new]
            others = [i for i in range(len(d.index)) if i not in visual]
            d.keep(others + kept)
        previous, previous_input = d.cos_sin(), d.hidden
        d.run_layer(layer)
    return d.logits()


def fitprune_logits(model, input_ids, pixel_values, removals, prompt=None, positions=None):
    """FitPrune: in each layer, after attention, drop the lowest cross x self (head-max)."""
    d = Decoder(model, input_ids, pixel_values, prompt, positions)
    for index, layer in enumerate(d.lm.layers):
        count = removals[index]

        def mid(probs, count=count):
            if not count:
                return None
            amax = probs[0].max(0).values
            visual = d.visual_rows()
            after = d.text_after_rows()
            self_attention = amax[visual][:, visual].sum(0) / len(visual)
            cross = amax[after][:, visual].sum(0)
            drop = {visual[j] for j in torch.sort(cross * self_attention).indices[:count].tolist()}
            return [i for i in range(len(d.index)) if i not in drop]

        d.run_layer(layer, mid)
    return d.logits()


def _density_peaks(x, clusters):
    n, dim = x.shape
    dist = torch.cdist(x[None], x[None])[0] / dim ** 0.5
    k = min(clusters, n)
    density = torch.exp(-(dist.topk(k, dim=-1, largest=False).values ** 2).mean(-1))
    delta = []
    for i in range(n):
        higher = [j for j in range(n) if density[j] > density[i]]
        delta.append(min(dist[i, j] for j in higher) if higher else dist.max())
    delta = torch.stack([torch.as_tensor(v, dtype=x.dtype) for v in delta])
    centres = torch.topk(density * delta, min(clusters, n)).indices.tolist()
    assign = [min(range(len(centres)), key=lambda c: float(dist[i, centres[c]])) for i in range(n)]
    for c, centre in enumerate(centres):
        assign[centre] = c
    return assign


def sparsevlm_logits(model, input_ids, pixel_values, layers, schedule, version="1.5", heads=14, recycle=0.3,
                     prompt=None, positions=None):
    """SparseVLM: raters from the input embeddings; prune after each layer of ``layers``."""
    d = Decoder(model, input_ids, pixel_values, prompt, positions)
    visual0 = d.visual_rows()
    text0 = d.text_after_rows()
    e = d.embeds[0]
    relevance = torch.softmax(e[visual0] @ e[text0].T, dim=-1).mean(0)
    raters = {text0[j] for j in range(len(text0)) if relevance[j] > relevance.mean()}  # original indices
    for index, layer in enumerate(d.lm.layers):
        cos, sin = d.cos_sin()
        probs, _ = _attention_probs(layer, d.hidden, cos, sin, d.mask()) if index in layers else (None, None)
        d.run_layer(layer)
        if index not in layers:
            continue
        rows = [i for i in range(len(d.index)) if d.index[i] in raters]
        visual = d.visual_rows()
        p = probs[0]
        if version == "2.0":
            ones = torch.ones_like(cos)
            rotated = _rope(ones[:, None], cos, sin)[:, 0]  # (1, N, d)
            gravity = (rotated @ rotated.transpose(1, 2))[0] * layer.self_attn.scaling
            p = p / gravity[None]
            mass = torch.stack([p[h][rows][:, visual].sum() for h in range(p.shape[0])])
            chosen_heads = torch.topk(mass, min(heads, p.shape[0])).indices
            p = p[chosen_heads]
        pbar = p.mean(0)
        rel = pbar[rows][:, visual].mean(0)
        k = min(schedule[layers.index(index)], len(visual) - 1)
        top = sorted(visual[j] for j in torch.topk(rel, k).indices.tolist())
        deleted = sorted(set(visual) - set(top))
        others = [i for i in range(len(d.index)) if i not in visual]
        new_tokens = []
        if version == "1.5" and deleted:
            scores = rel[[visual.index(i) for i in deleted]]
            n_rec = int(recycle * len(deleted)) + 1
            rec = [deleted[j] for j in torch.topk(scores, min(n_rec, len(deleted))).indices.tolist()]
            clusters = int(n_rec / 10) + 1
            x = d.hidden[0, rec]
            assign = _density_peaks(x, clusters)
            for c in range(clusters):
                members = [x[m] for m in range(len(rec)) if assign[m] == c]
                total = sum(members, torch.zeros_like(x[0]))
                new_tokens.append(total / (len(members) + 1e-6))
        kept = sorted(others + top)
        last_visual = max(i for i in kept if i in top)
        # the new tokens are inserted right after the last kept visual token
        before = [i for i in kept if i <= last_visual]
        after = [i for i in kept if i > last_visual]
        hidden = [d.hidden[0, i] for i in before] + new_tokens + [d.hidden[0, i] for i in after]
        index_list = [d.index[i] for i in before] + [-1] * len(new_tokens) + [d.index[i] for i in after]
        renumber = version == "1.5"
        pos = d.base[:len(index_list)] if renumber else (
            [d.pos[i] for i in before] + [d.pos[last_visual]] * len(new_tokens) + [d.pos[i] for i in after])
        d.hidden, d.index, d.pos = torch.stack(hidden)[None], index_list, pos
    return d.logits()


def cdpruner_features(model, pixel_values, texts, clip_dir, keep, relevance_sign=-1.0):
    """CDPruner, as the official ``encode_images``: CLIP relevance of each patch to the question
    (negative similarity by default), min-max normalised, a DPP kernel over the projector
    outputs' cosine similarity, greedy MAP with the Cholesky update; kept in spatial order.
    One image at a time, as the official code runs. The text tower is CLIP's own
    ``CLIPTextModelWithProjection`` (float32 unless the model is float64)."""
    import transformers
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    dtype = torch.float64 if model.dtype == torch.float64 else torch.float32
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load reports the other tower's keys as unexpected
    try:
        tokenizer = AutoTokenizer.from_pretrained(clip_dir)
        text_tower = CLIPTextModelWithProjection.from_pretrained(clip_dir, dtype=dtype)
        projection = CLIPVisionModelWithProjection.from_pretrained(clip_dir, dtype=dtype).visual_projection
    finally:
        transformers.logging.set_verbosity(verbosity)
    width = text_tower.config.max_position_embeddings
    tower = model.model.vision_tower
    out = []
    for image, text, x in zip(pixel_values, texts, projected(model, pixel_values)):
        hidden = tower(image[None], output_hidden_states=True).hidden_states[model.config.vision_feature_layer]
        patches = hidden[:, 1:]
        inputs = tokenizer(text=text, return_tensors="pt")
        segments = (inputs.input_ids.shape[1] - 1) // width + 1
        padding = width * segments - inputs.input_ids.shape[1]
        inputs = {k: torch.cat([v, v.new_zeros((v.shape[0], padding))], dim=1).reshape(-1, width)
                  for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        text_embeds = text_tower(**inputs).text_embeds
        image_embeds = projection(tower.post_layernorm(patches).to(dtype))
        unit = (x / x.norm(dim=-1, keepdim=True)).to(dtype)[None]
        similarity = unit @ unit.transpose(1, 2)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        relevance = (relevance_sign * (image_embeds @ text_embeds.T)).mean(-1)
        relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
        kernel = relevance[:, :, None] * similarity * relevance[:, None, :]
        n = kernel.shape[1]
        cis = torch.zeros(keep, n, dtype=dtype)
        di2s = torch.diagonal(kernel[0]).clone()
        selected = []
        for i in range(keep):
            j = int(torch.argmax(di2s))
            selected.append(j)
            eis = (kernel[0, j] - cis[:i, j] @ cis[:i]) / torch.sqrt(di2s[j])
            cis[i] = eis
            di2s -= eis ** 2
            di2s[j] = -float("inf")
        assert len(set(selected)) == keep
        out.append(x[sorted(selected)])
    return out


def fitprune_fit(model, samples, reduction_ratio):
    """FitPrune's ``statistical_analysis.py`` on ``samples`` ((input_ids, pixel_values) pairs):
    reference masses from the unreduced model, then for each bisected alpha the layer-outer,
    sample-inner loop with its FLOPs forecast (the official constants 4096 / 11008 replaced
    by the model's widths). Returns every (alpha, reached, table) tried, in order."""
    config = model.config.text_config
    d_model, ffn, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = d_model // config.num_attention_heads
    q_width, kv_width = d_model, config.num_key_value_heads * head_dim

    def attention_flops(n):  # the official ``tmp``: qkv, then qk^T and *v
        return n * d_model * q_width + 2 * n * d_model * kv_width + n * n * q_width * 2

    def after_flops(n):  # output projection + FFN
        return n * q_width * d_model + 3 * ffn * d_model * n

    def rest_flops(n, layer):
        return after_flops(n) + (attention_flops(n) + after_flops(n)) * (layers - 1 - layer)

    def masses(ids, px):
        d = Decoder(model, ids, px)
        cross, self_ = [], []
        for layer in d.lm.layers:
            def mid(probs):
                amax = probs[0].max(0).values
                visual, after = d.visual_rows(), d.text_after_rows()
                cross.append(amax[after][:, visual].sum().item() / len(after))
                self_.append(amax[visual][:, visual].sum().item() / len(visual))
            d.run_layer(layer, mid)
        return cross, self_

    reference = [masses(ids, px) for ids, px in samples]
    n0 = [len(Decoder(model, ids, px).visual_rows()) for ids, px in samples]
    origin = sum((attention_flops(n) + after_flops(n)) * layers for n in n0) / len(samples)

    def deleted(scores, total_reference, alpha):
        order = torch.argsort(scores, stable=True)
        total = scores.sum()
        count = len(scores) - 1  # every count keeps the mass: the loop's last
        for i in range(len(order)):
            if total - scores[order[:i]].sum() < total_reference - total_reference * alpha:
                count = max(i - 1, 0)
                break
        return set(order[:count].tolist())

    def fit_model(alpha):
        decoders = [Decoder(model, ids, px) for ids, px in samples]
        spent, scheme = 0, [0] * layers
        for index in range(layers):
            forecast = 0
            for d in decoders:
                n = len(d.visual_rows())
                spent += attention_flops(n)
                forecast += rest_flops(n, index)
            if (spent + forecast) / len(samples) <= origin * (1 - reduction_ratio):
                return True, [s // len(samples) for s in scheme]
            for s, d in enumerate(decoders):
                def mid(probs, s=s):
                    amax = probs[0].max(0).values
                    visual, after = d.visual_rows(), d.text_after_rows()
                    focus = amax[after][:, visual].sum(0) / len(after)
                    image = (amax[visual][:, visual] / len(visual)).sum(0)
                    both = (deleted(focus, reference[s][0][index], alpha)
                            & deleted(image, reference[s][1][index], alpha))
                    scheme[index] += len(both)
                    gone = {visual[j] for j in both}
                    return [i for i in range(len(d.index)) if i not in gone]
                d.run_layer(d.lm.layers[index], mid)
                spent += after_flops(len(d.visual_rows()))
        return False, [s // len(samples) for s in scheme]

    tried, low, high = [], 0.0, 1.0
    while high - low > 0.01 + 1e-6:
        alpha = (low + high) / 2
        reached, table = fit_model(alpha)
        tried.append((alpha, reached, table))
        high, low = (alpha, low) if reached else (high, alpha)
    return tried
