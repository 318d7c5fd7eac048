"""``--model fico`` for lmms-eval: any model fico loads, with a recipe applied around each batch.

    lmms-eval --model fico --model_args pretrained=toy|embedded|DIR,recipe=NAME,overrides="k=2;ratio=0.5" ...

The class knows no model family: it loads what :func:`fico.models.load_model` loads, builds
prompts with the family's prompt builder (the processor's chat template, or the family's own
format where the processor has none, as the toy's) and lets :func:`fico.apply` find the sites. The
recipe is loaded and validated in ``__init__``, before lmms-eval reads any data, so a bad
recipe is a :class:`fico.RecipeError`; errors during evaluation propagate (lmms-eval's own
LLaVA backend turns a failed ``generate()`` into an empty answer, which hides them).

Under ``torchrun`` / ``accelerate launch`` each process reads its rank and world size from
``RANK`` / ``WORLD_SIZE`` (and its GPU from ``LOCAL_RANK``), so the split also works on CPU,
where accelerate reports a single process. Per request the class records what ran (visual
tokens, the FLOPs of the prefill from its token counts, the prefill's wall time) in
:attr:`FicoLMM.statistics`, which ``fico eval`` reads.
"""

from __future__ import annotations

import copy
import os
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .. import apply, load_recipe
from ..adapters import family_of
from ..cost.model import TokenCounts, model_spec, prefill_cost
from ..errors import InputError
from ..models import load_model, parse_dtype
from .lmms import split_overrides_arg

#: the prompt where the processor has no chat template (LLaVA-1.5's, which the toy was trained on)


class FicoLMM(lmms):
    """lmms-eval model: ``pretrained`` (toy, embedded or a local checkpoint directory), an
    optional fico ``recipe`` (name or YAML path; ``none`` or absent: the unreduced model) with
    ``overrides`` (``;``-separated ``key=value``) and ``plugins`` (``;``-separated files).

    Args:
        dtype: float32 (default), float16, bfloat16, float64.
        attn_implementation: sdpa (default) or eager.
        batch_size: prompts per forward (left-padded).
        device: where the model runs (default: ``cuda:LOCAL_RANK`` where CUDA is, else cpu).
        prompt: a template with ``{context}`` (and ``{images}``, one image token per image)
            instead of the chat template.
        max_new_tokens: when a task's ``generation_kwargs`` does not say.
        convention: the FLOPs counting convention of :attr:`statistics` (``fico cost``'s).
        model: an already loaded ``(model, processor)`` pair, in-process only (``fico eval``).
    """

    is_simple = True

    def __init__(self, pretrained: str = "toy", recipe: str | None = None, overrides: str = "", plugins: str = "",
                 dtype: str = "float32", attn_implementation: str = "sdpa", batch_size: int | str = 1,
                 device: str | None = None, prompt: str | None = None, max_new_tokens: int = 32,
                 convention: str = "llm-viewer", model=None, **unknown) -> None:
        super().__init__()
        unknown.pop("max_batch_size", None)  # lmms-eval passes it to every model
        if unknown:
            raise InputError(f"--model_args: unknown {', '.join(sorted(unknown))} for --model fico; known: "
                             "pretrained, recipe, overrides, plugins, dtype, attn_implementation, batch_size, "
                             "device, prompt, max_new_tokens, convention")
        self.plugins = split_overrides_arg(plugins)
        self.recipe = self._load_recipe(recipe, overrides)  # before any model or data loads
        try:
            dtype = parse_dtype(dtype)
        except ValueError as error:
            raise InputError(f"--model_args dtype: {error}") from None
        if attn_implementation not in ("sdpa", "eager"):
            raise InputError(f"--model_args attn_implementation: sdpa or eager, got {attn_implementation!r}")
        self._rank = int(os.environ.get("RANK", 0))
        self._world_size = int(os.environ.get("WORLD_SIZE", 1))
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        if model is None:
            model = load_model(str(pretrained), dtype, attn_implementation)
        self.model, self.processor = model
        self.model.to(self._device).eval()
        self.processor.tokenizer.padding_side = "left"
        self.pretrained = str(pretrained)
        self.batch_size_per_gpu = int(batch_size)
        self.prompt, self.max_new_tokens, self.convention = prompt, int(max_new_tokens), convention
        self.spec = model_spec(self.model)
        if self.recipe is not None and self.recipe.budget is not None:
            # a budget names a model: solve it on this one for the same fraction of its cost
            self.recipe = self._load_recipe(recipe, overrides, budget_for=(self.model, self.recipe.budget.text_tokens))
        # lmms-eval's evaluator reads lm.accelerator (its gathers and barriers); under torchrun it
        # adopts the process group lmms-eval's command line started
        self.accelerator = Accelerator()
        self.statistics: list[dict] = []

    def _load_recipe(self, recipe, overrides, budget_for=None):
        if recipe is None or str(recipe).lower() in ("", "none", "unreduced"):
            return None
        return load_recipe(str(recipe), split_overrides_arg(overrides), plugins=self.plugins, budget_for=budget_for)

    # -- what lmms-eval reads
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    # -- prompts and inputs
    def prompt_text(self, context: str, images: int) -> str:
        """The prompt of ``context`` with ``images`` images, as the model expects it."""
        token = getattr(self.processor, "image_token", "<image>")
        if self.prompt is not None:
            return self.prompt.format(context=context, images=f"{token} " * images)
        return family_of(self.model).prompt(context, images, self.processor)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def _encode(self, texts: list[str], images: list) -> dict:
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = {k: v.to(self._device) for k, v in self.processor(**kwargs).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    # -- the evaluation interface
    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, as ``gen_kwargs`` say) answers, cut at the first ``until`` string."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}  # one batch runs one set of generation arguments
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="fico generate")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                texts = self._generate([requests[i] for i in batch], dict(requests[batch[0]].args[1]))
                for i, text in zip(batch, texts):
                    answers[i] = text
                progress.update(len(batch))
        progress.close()
        return answers

    def _generate(self, requests: list[Instance], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(gen_kwargs.pop("temperature", 0) or 0)
        sample = bool(gen_kwargs.pop("do_sample", False)) and temperature > 0
        options = {"do_sample": sample, "num_beams": int(gen_kwargs.pop("num_beams", 1) or 1)}
        if sample:
            options.update(temperature=temperature, top_p=gen_kwargs.pop("top_p", None) or 1.0)
        texts, contexts, images, per_sample = [], [], [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            texts.append(self.prompt_text(context, len(visuals)))
            contexts.append(context)
            images += visuals
            per_sample.append(len(visuals))
        inputs = self._encode(texts, images)
        tokenizer = self.tokenizer
        with torch.inference_mode(), _PrefillTimer(self.model) as timer, \
                (apply(self.model, self.recipe) if self.recipe is not None else nullcontext()) as run:
            out = self.model.generate(**inputs, **self._instruction(contexts), max_new_tokens=max_new,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                      **options)
        self._record(requests, inputs, per_sample, run, timer.seconds)
        answers = []
        for request, row in zip(requests, out[:, inputs["input_ids"].shape[1]:]):
            text = tokenizer.decode(row, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (request.args[0], request.args[1]), text)
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """Per request ``(loss, greedy)``: the mean negative log-likelihood of the continuation's
        tokens given the prompt, and whether greedy decoding gives the continuation.

        The prompt is a prefill, under the recipe, and the continuation follows as decode
        steps on its KV cache, exactly as ``generate`` would produce it: methods that reduce
        inside the decoder decide from the prompt (FastV ranks by the prompt's last query),
        never from the answer being scored. Requests that share a prompt (a question's
        choices) share one prefill; a one-token continuation is read from it.

        lmms-eval's convention, not lm-eval's: its LLaVA backends return the model's loss and
        its ``multiple_choice`` scoring takes the argmin. Each pair is wrapped in a
        ``GenerationResult``: lmms-eval 0.7.3's ``unwrap_generation_output`` turns a bare tuple
        into its string, which breaks every multiple-choice task; the wrapper's payload passes
        through unchanged.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        prompts: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            context, _, doc_to_visual, doc_id, task, split = request.args
            prompts.setdefault((context, doc_id, task, split), []).append(i)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="fico loglikelihood")
        for (context, doc_id, task, split), indices in prompts.items():
            visuals = self._visuals(requests[indices[0]].args[2], doc_id, task, split)
            prompt = self.prompt_text(context, len(visuals))
            prompt_inputs = self._encode([prompt], visuals)
            length = prompt_inputs["input_ids"].shape[1]
            continuations = []
            for i in indices:
                ids = self._encode([prompt + requests[i].args[1]], visuals)["input_ids"][0]
                if ids.shape[0] <= length:
                    raise InputError(f"fico loglikelihood: the continuation {requests[i].args[1]!r} adds no token "
                                     f"to the prompt")
                if not torch.equal(ids[:length], prompt_inputs["input_ids"][0]):
                    raise InputError(f"fico loglikelihood: the tokenizer merges the continuation "
                                     f"{requests[i].args[1]!r} into the prompt's last token; start it with a space")
                continuations.append(ids[length:])
            for i, logits, continuation in zip(indices, self._continuation_logits(requests[indices[0]], prompt_inputs,
                                                                                  continuations, len(visuals)),
                                               continuations):
                scores = (logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits).log_softmax(-1)
                picked = scores.gather(-1, continuation[:, None])[:, 0]
                pair = (-float(picked.mean()), bool((scores.argmax(-1) == continuation).all()))
                results[i] = GenerationResult(text=pair)
                self.cache_hook.add_partial("loglikelihood", requests[i].args[:2], pair)
            progress.update(len(indices))
        progress.close()
        return results

    def _continuation_logits(self, request, prompt: dict, continuations: list[torch.Tensor], images: int
                             ) -> list[torch.Tensor]:
        """Per continuation, ``(C, V)`` next-token logits before each of its tokens: one
        prefill of the prompt, then each continuation but its last token as decode steps on
        a copy of the prompt's cache (a one-token continuation needs only the prefill)."""
        out_logits = []
        with torch.inference_mode(), _PrefillTimer(self.model) as timer, \
                (apply(self.model, self.recipe) if self.recipe is not None else nullcontext()) as run:
            out = self.model(**prompt, **self._instruction([request.args[0]]), use_cache=True, logits_to_keep=1)
            # one record per prefill: a question's choices share it
            self._record([request], prompt, [images], run, timer.seconds)
            cache = out.past_key_values
            start = cache.get_seq_length()  # the prompt as the decoder received it (vision-side reduction shortens it)
            for continuation in continuations:
                logits = [out.logits[0, -1:]]
                if continuation.numel() > 1:
                    steps = continuation[None, :-1]
                    positions = family_of(self.model).continuation_position_ids(self.model, start, steps.shape[1],
                                                                                 steps.device)
                    mask = torch.ones(1, start + steps.shape[1], dtype=prompt["attention_mask"].dtype,
                                      device=steps.device)
                    decoded = self.model(input_ids=steps, attention_mask=mask, position_ids=positions,
                                         cache=copy.deepcopy(cache), use_cache=True)
                    logits.append(decoded.logits[0])
                out_logits.append(torch.cat(logits))
        return out_logits

    def _instruction(self, contexts: list[str]) -> dict:
        """The task's context (the question as lmms-eval writes it) for recipes that read it."""
        return self.recipe.instruction_inputs(contexts) if self.recipe is not None else {}

    def clean(self) -> None:
        """lmms-eval calls this after each evaluation, and its default deletes every module
        attribute; fico keeps the model, so one instance serves several evaluations (``fico
        eval`` runs each configuration and task with the same loaded model)."""
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("fico's lmms-eval model answers single-round tasks (generate_until, "
                                  "loglikelihood); multi-round generation is not supported")

    # -- what ran
    def _record(self, requests, inputs: dict, per_sample: list[int], run, seconds: float) -> None:
        """Per request: its visual tokens and the cost of its prefill (padding left out)."""
        mask = inputs["attention_mask"]
        real = mask.sum(1).tolist()
        placeholders = (inputs["input_ids"] == getattr(self.model.config, "image_token_id", -1)).sum(1).tolist()
        trace = run.trace if run is not None else None
        features = trace.vision_features if trace is not None else None
        sizes = inputs.get("image_sizes")  # where the model's count depends on the image's size
        image = 0
        for i, request in enumerate(requests):
            images = per_sample[i]
            text = real[i] - placeholders[i]
            stock = [self.spec.image(None if sizes is None else sizes[j].tolist())
                     for j in range(image, image + images)]
            if isinstance(features, list):
                mine = sum(features[image:image + images]) if images else 0
            else:
                mine = features * images if features is not None else sum(n for _, n, _ in stock)
            passes = stock[0][0] if stock else 1
            image += images
            if trace is None or not trace.llm:
                counts = TokenCounts.unreduced(self.spec, text, None if sizes is None else sizes[image - 1].tolist())
                counts = replace(counts, features=mine, llm=[text + mine] * self.spec.llm_layers,
                                 llm_mlp=None, projected=None, vision_passes=passes)
            else:
                counts = TokenCounts.from_trace(trace, self.spec)
                # every layer of the batch holds this sample's padding (and re-padding where images
                # kept different counts) besides its own tokens; reduction never removes padding;
                # ghost slots (samples of a ragged batch that kept more) are not this sample's
                extra = trace.llm[0] - (text + mine)
                ghosts = [trace.ghosts.get(layer, [0] * len(requests))[i] for layer in range(len(counts.llm))]
                counts = replace(counts, features=mine, text_tokens=text, vision_passes=passes,
                                 llm=[n - extra - g for n, g in zip(counts.llm, ghosts)],
                                 llm_mlp=[n - extra - g for n, g in zip(counts.llm_mlp, ghosts)])
            if not images:  # a text-only request never runs the vision tower
                counts = replace(counts, vision_in=[0] * len(counts.vision_in),
                                 vision_out=[0] * len(counts.vision_out), projected=0)
            average = float(mine)
            if trace is not None and trace.visual:
                # decoder layers' visual tokens, averaged (the first sample's, moved by this one's own count)
                first = features[0] if isinstance(features, list) else (features or self.spec.patches)
                average = trace.equivalent_tokens()["at_input"] + (mine - first)
            cost = prefill_cost(self.spec, counts, self.convention)
            self.statistics.append({"task": request.task_name, "doc_id": request.doc_id, "image_features": mine,
                                    "visual_tokens": average, "text_tokens": text,
                                    "tflops": cost.tflops, "prefill_seconds": seconds / len(requests),
                                    "batch": len(requests)})


class _PrefillTimer:
    """Wall time of the model's first forward inside the block (the prefill of a generate)."""

    def __init__(self, model) -> None:
        self.model, self.seconds, self._start = model, 0.0, None

    def _sync(self) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _before(self, module, args, kwargs):
        if self._start is None:
            self._sync()
            self._start = time.perf_counter()

    def _after(self, module, args, kwargs, output):
        if self._start is not None and not self.seconds:
            self._sync()
            self.seconds = time.perf_counter() - self._start

    def __enter__(self):
        self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.model.register_forward_hook(self._after, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

