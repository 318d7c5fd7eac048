"""Processors fico assembles itself where transformers cannot build the stock one.

The stock ``Qwen2VLProcessor`` (and Qwen2.5-VL's and Qwen3-VL's) also builds a video processor,
which needs torchvision; on a machine without it (a CPU install of torch) transformers fails
while constructing the processor, before any image is read. Images need only the stock image
processor and the tokenizer, which load fine: :class:`QwenVLProcessor` joins them with the
checkpoint's chat template and expands each image's ``<|image_pad|>`` into its run of
placeholders, with the ``mm_token_type_ids`` the model's M-RoPE reads, as the stock processor
does for images.

>>> from fico import embedded_qwen
>>> processor = embedded_qwen.build_processor("qwen2-vl")
>>> batch = processor(images=[embedded_qwen.example_image(0).resize((168, 112))],
...                   text=[processor.apply_chat_template([{"role": "user", "content": [
...                       {"type": "image"}, {"type": "text", "text": "what is the color ?"}]}],
...                       add_generation_prompt=True)])
>>> batch["image_grid_thw"].tolist(), int(batch["mm_token_type_ids"].sum())
([[1, 8, 12]], 24)
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


class QwenVLProcessor:
    """A Qwen-VL processor for images: ``processor(images=..., text=...)`` gives ``input_ids``,
    ``attention_mask``, ``mm_token_type_ids`` (left-padded), ``pixel_values`` and
    ``image_grid_thw``.

    Args:
        image_processor: the checkpoint's image processor (``Qwen2VLImageProcessor``).
        tokenizer: its tokenizer, in which ``image_token`` is one token.
        chat_template: its chat template (Jinja), or None.
    """

    def __init__(self, image_processor, tokenizer, chat_template: str | None = None,
                 image_token: str = "<|image_pad|>"):
        self.image_processor, self.tokenizer, self.chat_template = image_processor, tokenizer, chat_template
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.merge = getattr(image_processor, "merge_size", 2)

    def __call__(self, images=None, text=None, return_tensors: str = "pt", padding: bool = True, **kwargs) -> dict:
        texts = [text] if isinstance(text, str) else list(text)
        if not images:
            encoded = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            ids = encoded["input_ids"]
            return {"input_ids": ids, "attention_mask": encoded["attention_mask"],
                    "mm_token_type_ids": torch.zeros_like(ids, dtype=torch.int32)}
        encoded = self.image_processor(images=images, return_tensors="pt")
        out = self.expand(texts, encoded["image_grid_thw"])
        out["pixel_values"] = encoded["pixel_values"]
        out["image_grid_thw"] = encoded["image_grid_thw"]
        return out

    def expand(self, texts: list[str], image_grid_thw: torch.Tensor) -> dict:
        """``input_ids``, ``attention_mask`` and ``mm_token_type_ids`` of ``texts``, each image
        token expanded to its image's ``t h w / merge^2`` placeholders (images in order over the
        texts), left-padded."""
        counts = (image_grid_thw.prod(-1) // self.merge ** 2).tolist()
        image, rows = 0, []
        for text in texts:
            expanded = []
            for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]:
                if i == self.image_token_id:
                    if image >= len(counts):
                        raise ValueError(f"more {self.image_token} in the text than the {len(counts)} images")
                    expanded += [i] * counts[image]
                    image += 1
                else:
                    expanded.append(i)
            rows.append(expanded)
        if image != len(counts):
            raise ValueError(f"{image} {self.image_token} in the text for {len(counts)} images")
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": input_ids, "attention_mask": mask,
                "mm_token_type_ids": (input_ids == self.image_token_id).int() * mask.int()}

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs) -> str:
        """The conversation in the checkpoint's chat template (text; images as their tokens)."""
        if not self.chat_template:
            raise ValueError("this processor has no chat template")
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    def save_pretrained(self, directory) -> None:
        directory = Path(directory)
        self.image_processor.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        if self.chat_template:
            (directory / CHAT_TEMPLATE_FILES[0]).write_text(self.chat_template)

    @classmethod
    def from_pretrained(cls, directory) -> "QwenVLProcessor":
        """From a checkpoint directory: its image processor, tokenizer and chat template."""
        import json

        from transformers import AutoImageProcessor, AutoTokenizer

        directory = Path(directory)
        image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        template = None
        for name in CHAT_TEMPLATE_FILES:
            path = directory / name
            if path.is_file():
                text = path.read_text()
                template = json.loads(text)["chat_template"] if name.endswith(".json") else text
                break
        return cls(image_processor, tokenizer, template or getattr(tokenizer, "chat_template", None))
