"""fico as an lmms-eval model, and the toy VQA as an lmms-eval task.

lmms-eval finds the model through the ``lmms_eval.models`` entry point of fico's
``pyproject.toml``, which names :func:`manifest`; nothing here imports lmms-eval or torch
at module level, so the entry point is inert where lmms-eval is absent. With ``make lmms``::

    fico toy-task tasks/                       # writes tasks/fico_toy_vqa/ (and the _mc variant)
    lmms-eval --model fico --model_args pretrained=toy,recipe=fastv,overrides="k=2;ratio=0.5" \\
        --tasks fico_toy_vqa --include_path tasks/ --output_path out/

``model_args`` are those of :class:`fico.integrations.lmms_model.FicoLMM`.

>>> split_overrides_arg('"k=2;ratio=0.5"')
['k=2', 'ratio=0.5']
>>> split_overrides_arg("")
[]
"""

from __future__ import annotations

import io
import json
from pathlib import Path

#: the toy VQA tasks fico writes on demand: answers by generation, and by choice log-likelihood
TOY_TASKS = {"fico_toy_vqa": "generate_until", "fico_toy_vqa_mc": "multiple_choice"}
#: toy test images per task by default (six questions each)
TOY_IMAGES = 50

TOY_UTILS = '''"""fico's toy VQA for lmms-eval (written by ``fico toy-task``; the data comes from fico.toy.data)."""

import io

from PIL import Image


def doc_to_visual(doc):
    image = doc["image"]
    if isinstance(image, dict):  # parquet without the datasets Image feature: the encoded bytes
        image = Image.open(io.BytesIO(image["bytes"]))
    return [image.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def doc_to_choice(doc):
    return list(doc["choices"])


def doc_to_target(doc):
    return doc["answer"]


def process_results(doc, results):
    words = results[0].strip().split()
    return {"exact_match": float(bool(words) and words[0] == doc["answer"])}
'''

TOY_YAML = {
    "generate_until": """task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: test.parquet   # relative to this file
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: 1
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
  fico: {meta}
""",
    "multiple_choice": """task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: test.parquet   # relative to this file
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_target
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
  fico: {meta}
""",
}


def manifest():
    """The lmms-eval model manifest of ``--model fico`` (called by lmms-eval, which is imported then)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="fico", simple_class_path="fico.integrations.lmms_model.FicoLMM")


def split_overrides_arg(text: str | None) -> list[str]:
    """``overrides`` of ``--model_args``: ``key=value`` pairs separated by ``;`` (lmms-eval
    splits ``model_args`` on commas and keeps quotes, so they are stripped here)."""
    text = (text or "").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return [part.strip() for part in text.split(";") if part.strip()]


def toy_questions(images: int = TOY_IMAGES, first_image: int = 0) -> list[dict]:
    """The toy test set's questions on ``images`` test images from ``first_image`` on, as
    task documents: image (PNG bytes), question, answer, the answer's choices, type, seed."""
    from ..toy.data import ANSWERS, TEST_SEEDS, example

    docs = []
    for seed in range(TEST_SEEDS.start + first_image, TEST_SEEDS.start + first_image + images):
        ex = example(seed)
        buffer = io.BytesIO()
        ex.image.save(buffer, format="PNG")
        for q in ex.questions:
            docs.append({"image": {"bytes": buffer.getvalue(), "path": None}, "question": q.text,
                         "answer": q.answer, "choices": list(ANSWERS[q.kind]), "kind": q.kind, "seed": seed})
    return docs


def write_toy_task(directory: str | Path, images: int = TOY_IMAGES, first_image: int = 0) -> list[Path]:
    """Write the toy VQA tasks (:data:`TOY_TASKS`) under ``directory``, one folder each (YAML,
    ``utils.py``, ``test.parquet``), for ``--include_path directory``. Deterministic: the same
    arguments write the same questions. Returns the task folders."""
    from datasets import Dataset, Features, Image, Sequence, Value

    docs = toy_questions(images, first_image)
    features = Features({"image": Image(), "question": Value("string"), "answer": Value("string"),
                         "choices": Sequence(Value("string")), "kind": Value("string"), "seed": Value("int64")})
    table = Dataset.from_list(docs, features=features)
    meta = json.dumps({"images": images, "first_image": first_image})
    folders = []
    for name, output_type in TOY_TASKS.items():
        folder = Path(directory) / name
        folder.mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(folder / "test.parquet"))
        (folder / "utils.py").write_text(TOY_UTILS)
        (folder / f"{name}.yaml").write_text(TOY_YAML[output_type].format(name=name, meta=meta))
        folders.append(folder)
    return folders
