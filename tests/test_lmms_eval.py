"""fico inside lmms-eval (installed by `make lmms`, which `make test` runs): the model class,
the toy tasks, the command line, two processes, and `fico eval`."""

import json
import os
import subprocess
import sys

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval")

import fico  # noqa: E402
from fico.commands.cli import main  # noqa: E402
from fico.integrations.lmms import toy_questions, write_toy_task  # noqa: E402

IMAGES = 4  # 24 questions: enough to tell methods apart, quick on 2 cores
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    saved = {k: os.environ.get(k) for k in [*OFFLINE, "HF_HOME"]}
    os.environ.update(OFFLINE, HF_HOME=str(home))
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, offline):
    folder = tmp_path_factory.mktemp("tasks")
    write_toy_task(folder, IMAGES)
    return folder


@pytest.fixture(scope="module")
def toy():
    from fico.models import load_model

    return load_model("toy")


def _evaluate(model, task, folder, **kwargs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(folder)], include_defaults=False)
    return simple_evaluate(model=model, tasks=[task], task_manager=manager, batch_size=model.batch_size,
                           log_samples=False, **kwargs)["results"][task]


def _toy_evaluator(model, processor, recipe, choices=False):
    """What fico's own toy evaluator answers on the same questions (argmax of the next token,
    over the vocabulary or over the question's choices)."""
    import io

    from PIL import Image

    from fico.toy.evaluate import answer_logits

    docs = toy_questions(IMAGES)
    images = [Image.open(io.BytesIO(d["image"]["bytes"])).convert("RGB") for d in docs]
    with torch.no_grad(), (fico.apply(model, recipe) if recipe else torch.no_grad()):
        logits = answer_logits(model, processor, images, [d["question"] for d in docs], recipe=recipe)
    vocab = processor.tokenizer
    right = 0
    for row, doc in zip(logits, docs):
        if choices:
            ids = vocab.convert_tokens_to_ids(doc["choices"])
            guess = doc["choices"][int(row[ids].argmax())]
        else:
            guess = vocab.convert_ids_to_tokens(int(row.argmax()))
        right += guess == doc["answer"]
    return right / len(docs)


@pytest.mark.parametrize("recipe", [None, "fastv", "visionzip"])
def test_scores_are_the_toy_evaluators_on_the_same_questions(toy, tasks, recipe):
    from fico.integrations.lmms_model import FicoLMM

    lm = FicoLMM(pretrained="toy", recipe=recipe, batch_size=5, model=toy)
    generated = _evaluate(lm, "fico_toy_vqa", tasks)["exact_match,none"]
    chosen = _evaluate(lm, "fico_toy_vqa_mc", tasks)["acc,none"]
    loaded = fico.load_recipe(recipe) if recipe else None
    assert generated == pytest.approx(_toy_evaluator(*toy, loaded), abs=1e-12)
    assert chosen == pytest.approx(_toy_evaluator(*toy, loaded, choices=True), abs=1e-12)
    generated_requests = [s for s in lm.statistics if s["task"] == "fico_toy_vqa"]
    assert len(generated_requests) == IMAGES * 6  # one record per request
    spec = fico.cost.model_spec(toy[0])
    for record in generated_requests:
        unreduced = fico.cost.recipe_cost(spec, None, record["text_tokens"]).tflops
        if recipe:  # what ran is cheaper than the unreduced prefill of the same prompt
            assert record["tflops"] < unreduced
        else:
            assert record["tflops"] == pytest.approx(unreduced, rel=1e-12) and record["visual_tokens"] == 576 == record["image_features"]


def test_a_method_that_reads_the_question_gets_the_tasks_context(toy, tasks, tmp_path):
    """CDPruner rates tokens by the question's CLIP embedding: lmms-eval's context reaches it as
    the instruction, so its scores are the toy evaluator's with the same questions."""
    from fico import embedded
    from fico.integrations.lmms_model import FicoLMM

    clip = tmp_path / "clip"
    embedded.save_clip_checkpoint(clip, vision_width=toy[0].config.vision_config.hidden_size)
    overrides = [f"text_encoder={clip}", "keep=64"]
    lm = FicoLMM(pretrained="toy", recipe="cdpruner", overrides=";".join(overrides), batch_size=5, model=toy)
    loaded = fico.load_recipe("cdpruner", overrides)
    assert _evaluate(lm, "fico_toy_vqa", tasks)["exact_match,none"] == pytest.approx(
        _toy_evaluator(*toy, loaded), abs=1e-12)
    assert _evaluate(lm, "fico_toy_vqa_mc", tasks)["acc,none"] == pytest.approx(
        _toy_evaluator(*toy, loaded, choices=True), abs=1e-12)
    assert {s["image_features"] for s in lm.statistics} == {64}


def test_cost_per_request_does_not_depend_on_the_batch(toy, tasks):
    """The FLOPs recorded per request leave the batch's padding out."""
    from fico.integrations.lmms_model import FicoLMM

    costs = []
    for batch in (1, 6):
        lm = FicoLMM(pretrained="toy", recipe="fastv", batch_size=batch, model=toy)
        _evaluate(lm, "fico_toy_vqa", tasks, limit=6)
        costs.append(sorted((s["doc_id"], round(s["tflops"], 12), s["visual_tokens"]) for s in lm.statistics))
    assert costs[0] == costs[1]


def test_a_bad_recipe_fails_before_any_data_is_read(toy):
    from fico.integrations.lmms_model import FicoLMM

    with pytest.raises(fico.RecipeError, match="ratio"):
        FicoLMM(pretrained="toy", recipe="fastv", overrides="ratio=2", model=toy)
    with pytest.raises(fico.InputError, match="unknown colour"):
        FicoLMM(pretrained="toy", colour="red", model=toy)
    with pytest.raises(fico.InputError, match="dtype: unknown dtype 'fp12'"):
        FicoLMM(pretrained="toy", dtype="fp12", model=toy)
    with pytest.raises(fico.ModelNotFoundError, match="no such"):
        FicoLMM(pretrained="toyy")


def test_a_budget_variant_is_solved_for_the_model_that_runs(toy):
    """budgets/* name LLaVA-1.5-7B; on the toy they are solved for the same fraction of its cost."""
    from fico.integrations.lmms_model import FicoLMM

    budget = FicoLMM(pretrained="toy", recipe="budgets/fastv_1.5t", model=toy).recipe.budget
    assert budget.solved_for == fico.cost.model_spec(toy[0]).name
    # FastV cannot cut the toy's vision-dominated cost to 18% of it: kept, and labelled as not equal-cost
    assert budget.fraction == pytest.approx(1.5 / 8.4535, rel=1e-3)
    assert not budget.equal_cost and budget.solved_fraction > budget.fraction


def _cli(args, env, timeout=300):
    return subprocess.run(args, env={**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", **env},
                          capture_output=True, text=True, timeout=timeout)


def _results_file(folder):
    found = list(folder.rglob("*_results.json"))
    assert len(found) == 1, list(folder.rglob("*"))
    return json.loads(found[0].read_text())["results"]


def test_the_command_line_with_one_and_two_processes(tasks, offline, tmp_path, toy):
    """`lmms-eval --model fico` resolves through the entry point; lmms-eval exits 0 on failure,
    so the results file is what is checked. Two processes split the documents and give the
    single-process scores."""
    arguments = ["-m", "lmms_eval", "--model", "fico", "--model_args",
                 'pretrained=toy,recipe=fastv,overrides="k=2;ratio=0.5"', "--batch_size", "4",
                 "--tasks", "fico_toy_vqa", "--include_path", str(tasks), "--verbosity", "DEBUG"]
    env = {"HF_HOME": str(offline)}
    one = _cli([sys.executable, *arguments, "--output_path", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
                *arguments, "--output_path", str(tmp_path / "two")], env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 1" in two.stderr or "rank 1" in two.stdout
    single, split = _results_file(tmp_path / "one"), _results_file(tmp_path / "two")
    assert split["fico_toy_vqa"]["exact_match,none"] == single["fico_toy_vqa"]["exact_match,none"]
    assert single["fico_toy_vqa"]["exact_match,none"] == pytest.approx(
        _toy_evaluator(*toy, fico.load_recipe("fastv", "k=2;ratio=0.5")), abs=1e-12)


def test_fico_eval_writes_the_table_json_and_plot_and_resumes(tmp_path, offline, capsys):
    out = tmp_path / "eval"
    args = ["eval", "fastv", "--tasks", "fico_toy_vqa", "--toy-images", "2", "--out", str(out), "--batch-size", "6"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fico_toy_vqa (exact_match, 12 samples) on toy" in printed and "retention" in printed
    report = json.loads((out / "eval.json").read_text())
    rows = report["tasks"]["fico_toy_vqa"]
    assert [r["configuration"] for r in rows] == ["unreduced", "fastv"]
    assert rows[1]["tflops"] < rows[0]["tflops"] and rows[0]["retention"] == 1.0
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (out / "results.jsonl").read_text().splitlines()
    assert main(args) == 0  # every cell is resumed: nothing new is appended
    assert (out / "results.jsonl").read_text().splitlines() == lines
    assert main([*args[:-2], "--batch-size", "3"]) == 2  # other conditions: refused, not mixed
    assert "other conditions" in capsys.readouterr().err


def _scored_against_one_forward(model, processor, pretrained: str, recipe: str | None, image) -> str:
    """Score a 3-token continuation through FicoLMM (prompt prefill, then decode steps on its
    cache) and check it against one forward over prompt and continuation; returns the prompt."""
    from lmms_eval.api.instance import Instance

    from fico.integrations.lmms_model import FicoLMM

    lm = FicoLMM(pretrained=pretrained, recipe=recipe, model=(model, processor))
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    context, continuation = "what is the color of the circle ?", " the color of"
    request = Instance("loglikelihood", (context, continuation, lambda doc: [doc["image"]], 0, "t", "test"), 0,
                       {"task": "t", "doc_id": 0, "repeats": 1})
    loss, greedy = lm.loglikelihood([request])[0].text
    prompt = lm.prompt_text(context, 1)
    whole = dict(processor(images=[image], text=[prompt + continuation], return_tensors="pt"))
    whole["pixel_values"] = whole["pixel_values"].double()
    count = whole["input_ids"].shape[1] - processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    assert count == 3
    with torch.no_grad(), (fico.apply(model, fico.load_recipe(recipe)) if recipe else torch.no_grad()):
        logits = model(**whole).logits[0, -count - 1:-1].log_softmax(-1)
    expected = -logits.gather(-1, whole["input_ids"][0, -count:, None]).mean()
    assert loss == pytest.approx(float(expected), abs=1e-9)
    assert greedy == bool((logits.argmax(-1) == whole["input_ids"][0, -count:]).all())
    return prompt


@pytest.mark.parametrize("recipe", [None, "visionzip"])
def test_a_longer_continuation_is_decoded_on_the_prompts_cache(recipe):
    """Prompt prefill + the continuation as decode steps gives what one forward over prompt
    and continuation gives, where the reduction does not depend on the text (unreduced, or
    reduced before the decoder, which shortens the prompt the cache holds)."""
    from fico import embedded

    model, processor = embedded.build_model(dtype=torch.float64), embedded.build_processor()
    _scored_against_one_forward(model, processor, "embedded", recipe, embedded.example_image(0))


@pytest.mark.parametrize("args,message", [
    (["fastv", "no_such_recipe"], "no_such_recipe"),
    (["fastv", "--tasks", "no_such_task"], "--tasks: unknown task 'no_such_task'"),
    (["fastv", "--include-path", "/no/such/dir"], "--include-path /no/such/dir: no such directory"),
])
def test_fico_eval_refuses_bad_input_before_evaluating(args, message, tmp_path, offline, capsys):
    if "--tasks" not in args:
        args = [*args, "--tasks", "fico_toy_vqa"]
    assert main(["eval", *args, "--out", str(tmp_path / "eval"), "--toy-images", "1"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "eval" / "results.jsonl").exists()


def test_a_llava_next_checkpoint_answers_a_local_task(tasks, tmp_path):
    """`--model fico` with a LLaVA-NeXT checkpoint directory: its processor's anyres inputs, its
    prompt format, and a cost per request that counts its own crops and tokens."""
    from fico import embedded_next
    from fico.integrations.lmms_model import FicoLMM

    directory = tmp_path / "next"
    embedded_next.build_model(crop=112, vision_layers=2, llm_layers=4).save_pretrained(directory)
    embedded_next.build_processor(crop=112).save_pretrained(directory)
    costs = {}
    for recipe in (None, "fastv", "pool"):
        lm = FicoLMM(pretrained=str(directory), recipe=recipe, batch_size=3)
        result = _evaluate(lm, "fico_toy_vqa", tasks, limit=6)
        assert 0 <= result["exact_match,none"] <= 1
        costs[recipe] = sum(s["tflops"] for s in lm.statistics)
        assert len(lm.statistics) == 6
    assert costs["fastv"] < costs[None] and costs["pool"] < costs[None]


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
@pytest.mark.parametrize("recipe", [None, "random"])
def test_a_qwen_continuation_is_decoded_on_the_prompts_cache_with_its_m_rope_positions(family, recipe):
    """Scoring a continuation on a Qwen-VL model: the decode steps after the prompt's prefill
    continue its M-RoPE positions (rope_deltas; after a pre_llm step, fico's), so they give
    what one forward over prompt and continuation gives."""
    from fico import embedded_qwen

    model = embedded_qwen.build_model(family, dtype=torch.float64)
    prompt = _scored_against_one_forward(model, embedded_qwen.build_processor(family), f"embedded-{family}", recipe,
                                         embedded_qwen.example_image(0).resize((192, 128)))
    assert prompt.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>what")  # its template


def test_a_qwen_checkpoint_answers_a_local_task(tasks, tmp_path):
    """`--model fico` with a Qwen2.5-VL checkpoint directory: its processor (assembled from the
    checkpoint's image processor, tokenizer and chat template where transformers cannot build
    the stock one), its chat template, and a cost per request that counts its own tower."""
    from fico import embedded_qwen
    from fico.integrations.lmms_model import FicoLMM

    directory = tmp_path / "qwen"
    embedded_qwen.build_model("qwen2.5-vl").save_pretrained(directory)
    embedded_qwen.build_processor("qwen2.5-vl").save_pretrained(directory)
    costs = {}
    for recipe, overrides in ((None, ""), ("fastv", ""), ("vispruner", "site=pre_llm;signal=attention_received")):
        lm = FicoLMM(pretrained=str(directory), recipe=recipe, overrides=overrides, batch_size=3)
        assert lm.prompt_text("how many ?", 1).endswith("how many ?<|im_end|>\n<|im_start|>assistant\n")
        result = _evaluate(lm, "fico_toy_vqa", tasks, limit=6)
        assert 0 <= result["exact_match,none"] <= 1
        costs[recipe] = sum(s["tflops"] for s in lm.statistics)
        assert len(lm.statistics) == 6
    assert costs["fastv"] < costs[None] and costs["vispruner"] < costs[None]
