"""Names of the measurements a site can hand to the stages.

Sites compute only the signals the components of a step ask for, from the layer's own
queries and keys, so the model keeps its SDPA (or flash) attention. Each signal is a
tensor over the tokens present at the step (or, where noted, a function of the rows a
component chooses):

``keys``
    ``(B, N, d)`` the layer's attention keys averaged over heads (ToMe's metric). Vision
    site: keys of the current layer. LLM site: post-RoPE keys of the previous layer.
``cls_attention``
    ``(B, N)`` head-mean softmax attention from the [CLS] query to every token (its own
    column included, not renormalised). Vision site only, and only on towers with [CLS].
``last_query_attention``
    ``(B, N)`` head-mean softmax attention from the last input token (per sample, the
    last non-padding token) in the previous decoder layer. LLM site only.
``text_attention``
    ``(B, N)`` head-mean softmax attention each token receives from the text tokens that
    come after the first visual token, averaged over those text queries (previous decoder
    layer). LLM site only.
``attention``
    ``(B, N, N)`` head-mean softmax attention, rows = queries, columns = keys (causal in
    the LLM: the previous layer's). Computed explicitly, so it costs O(N^2) memory.
``attention_logits``
    ``(B, N, N)`` head-mean pre-softmax logits ``q.k / sqrt(d)``, before any mask or
    proportional-attention bias (what the official FiCoCo code scores with).
``next_cls_attention_fullwidth``
    ``(B, N)`` vision_output site: ``softmax(q k^T / sqrt(C))`` of the [CLS] row, from the
    next layer's q/k projections taken as one C-wide head (PruMerge's quantity).
``next_keys_fullwidth``
    ``(B, N, C)`` vision_output site: the next layer's k projections, all heads (PruMerge).
``attention_rows``
    LLM sites: a function ``rows (B, R) -> (B, R, N)``, the softmax attention of the query
    rows a component chooses (``heads``: ``mean``, ``max``, ``sum``; ``all`` gives
    ``(B, H, R, N)``). Only those rows are formed (SparseVLM's raters, FitPrune's rows).
``key_norms``
    ``(B, N)`` LLM site: L1 norm of each token's post-RoPE key, heads concatenated as the
    query heads see them (DART's pivot score).
``rope_gravity``
    LLM sites: a function ``rows -> (B, R, N)``, the RoPE-only logits of all-ones queries
    and keys (SparseVLM v2's correction).
``final_normed_hidden``
    ``(B, N, D)`` llm site: the hidden states through the language model's final norm (DART).
``input_embeddings``
    ``(B, N, D)`` LLM sites: each token's input embedding to the language model (SparseVLM's
    rater choice).
``attention_received``
    ``(B, N)`` pre_llm site of towers without [CLS] (Qwen-VL): the attention each merged
    token's patches receive in a vision block (the step's ``vision_layer``; default the
    family's last full-attention block), averaged over heads, over every query patch of its
    image and over its 2 x 2 patches (``fico.adapters.towers.packed_vit``). The [CLS]-free
    substitute for ``cls_attention`` (VisPruner's maintainers' choice on Qwen2.5-VL). There,
    ``keys`` are the block's head-mean keys before its rotary positions, averaged likewise.
``instruction_similarity``
    ``(B, N)`` pre_llm site: each token's cosine similarity to the instruction in CLIP's
    joint space, averaged over the instruction's 77-token segments: the image side is the
    vision tower's post-layernorm applied to the token's feature-layer state and CLIP's
    visual projection, the text side CLIP's text tower (CDPruner). Needs the step's
    ``text_encoder`` (a local CLIP checkpoint) and the instruction text of each sample,
    given as ``instruction=`` to the reduced model's ``generate`` or ``forward``.
"""

from __future__ import annotations

from .errors import RecipeError

SIGNALS: dict[str, str] = {
    "keys": "head-mean attention keys (B, N, d)",
    "cls_attention": "head-mean softmax attention from [CLS] (B, N)",
    "last_query_attention": "head-mean softmax attention from the last input token, previous layer (B, N)",
    "text_attention": "head-mean softmax attention received from the text after the image, previous layer (B, N)",
    "attention": "head-mean softmax attention matrix (B, N, N)",
    "attention_logits": "head-mean pre-softmax attention logits, unmasked (B, N, N)",
    "next_cls_attention_fullwidth": "[CLS] row of the next vision layer's attention as one full-width head (B, N)",
    "next_keys_fullwidth": "the next vision layer's k projections, all heads (B, N, C)",
    "attention_rows": "function: softmax attention of chosen query rows (B, R, N)",
    "key_norms": "L1 norm of post-RoPE keys, heads concatenated (B, N)",
    "rope_gravity": "function: RoPE-only logits of all-ones q and k, chosen rows (B, R, N)",
    "final_normed_hidden": "hidden states through the language model's final norm (B, N, D)",
    "input_embeddings": "the language model's input embeddings of the tokens present (B, N, D)",
    "attention_received": "head- and query-mean attention each token receives in a vision block, no [CLS] (B, N)",
    "instruction_similarity": "CLIP similarity of each token to the instruction, mean over 77-token segments (B, N)",
}
#: signals computed from the instruction text by an auxiliary text tower (the step's ``text_encoder``)
INSTRUCTION_SIGNALS = {"instruction_similarity"}


def check_signal_name(name: str) -> None:
    if name not in SIGNALS:
        raise RecipeError(f"unknown signal {name!r}; known signals: {', '.join(SIGNALS)}")
