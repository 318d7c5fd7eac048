"""Names of the measurements a site can hand to the stages.

Sites compute only the signals the components of a step ask for, from the layer's own
queries and keys, so the model keeps its SDPA (or flash) attention. Each signal is a
tensor over the tokens present at the step:

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
}


def check_signal_name(name: str) -> None:
    if name not in SIGNALS:
        raise RecipeError(f"unknown signal {name!r}; known signals: {', '.join(SIGNALS)}")
