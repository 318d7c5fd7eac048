"""The model's entry points, ``forward`` and ``generate``, wrapped so that a family can prepare
the call first (encode the images, rebuild the placeholders) while callers keep passing the
processor's unchanged inputs."""

from __future__ import annotations

import functools
import inspect
from typing import Callable

from ..run import ReductionRun
from .hooks import set_instance_attr
from .placeholders import restore_prompt


def wrap_entry_points(run: ReductionRun, model, prepare: Callable[[dict], dict]) -> None:
    """Replace ``model.forward`` and ``model.generate`` (on the instance, undone with the run) by
    wrappers that pass each call through ``prepare(call) -> call`` once: ``generate`` prepares
    its inputs, and the forwards it runs inside are not prepared again. ``generate``'s output
    starts with the caller's own prompt even where ``prepare`` changed its length."""
    original_forward, original_generate = model.forward, model.generate
    forward_signature = inspect.signature(original_forward)
    inside_generate = False

    def forward(*args, **kwargs):
        bound = forward_signature.bind_partial(*args, **kwargs)
        call = dict(bound.arguments)
        call.update(call.pop("kwargs", {}))
        if not inside_generate:
            call = prepare(call)
        return original_forward(**call)

    def generate(inputs=None, **kwargs):
        nonlocal inside_generate
        if inputs is not None:
            kwargs["input_ids"] = inputs
        original_ids = kwargs.get("input_ids")
        call = prepare(dict(kwargs))
        inside_generate = True
        try:
            out = original_generate(**call)
        finally:
            inside_generate = False
        if original_ids is None or call.get("input_ids") is original_ids:
            return out
        return restore_prompt(out, original_ids, call["input_ids"].shape[1])

    functools.update_wrapper(forward, original_forward)
    functools.update_wrapper(generate, original_generate)
    set_instance_attr(run, model, "forward", forward)
    set_instance_attr(run, model, "generate", generate)
