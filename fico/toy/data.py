"""Synthetic VQA: deterministic images of shapes and a digit, with one-word-answer questions.

An image is a 4 x 4 grid of 84-pixel cells (6 x 6 patches of 14 pixels each). Some cells
hold a coloured shape, one holds a black digit. Question types and what they need:

``color``    colour of the shape in a named cell ("row2 col1")   -> locate a cell, read colour
``shape``    shape in a named cell                               -> locate a cell, read shape
``count``    how many shapes of a colour                         -> aggregate over the image
``exists``   is there a <colour> <shape>                         -> search
``position`` is the <colour> <shape> left of / above the <colour> <shape> -> relate two objects
``digit``    which digit is written                              -> read a small rendered detail

``example(seed)`` is deterministic; train and test use disjoint seed ranges.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_SIZE = 336
GRID = 4
CELL = IMAGE_SIZE // GRID
PATCH = 14
COLORS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 75, 225), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
QUESTION_TYPES = ("color", "shape", "count", "exists", "position", "digit")
TRAIN_SEEDS = range(0, 10_000_000)
TEST_SEEDS = range(10_000_000, 10_100_000)
VALIDATION_SEEDS = range(10_100_000, 10_200_000)  # checkpoint selection during training

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER:", "ASSISTANT:"]
WORDS = (["what", "color", "shape", "is", "at", "how", "many", "objects", "are", "there", "a", "the", "left",
          "of", "above", "object", "digit", "written", "?", "yes", "no"]
         + [f"row{i}" for i in range(GRID)] + [f"col{i}" for i in range(GRID)]
         + list(COLORS) + list(SHAPES) + [str(d) for d in range(10)])
VOCAB = SPECIAL + WORDS
ANSWERS = {"color": list(COLORS), "shape": list(SHAPES), "count": [str(d) for d in range(4)],
           "exists": ["yes", "no"], "position": ["yes", "no"], "digit": [str(d) for d in range(10)]}

DIGIT_STROKE = 2  # pixels of outline around the glyph: a bold digit

# per-patch labels for the auxiliary vision loss
BACKGROUND = 0
PATCH_CLASSES = 1 + len(COLORS) * len(SHAPES) + 10  # background, colour x shape, digit 0-9

_mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass
class Question:
    kind: str
    text: str
    answer: str
    cells: tuple = ()  # grid cells (row, col) holding what the answer depends on, where defined


@dataclass
class Example:
    image: Image.Image
    questions: list[Question]
    patch_labels: np.ndarray  # (576,) int
    objects: list = field(default_factory=list)


def _font(size: int):
    return ImageFont.load_default(size=size)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def example(seed: int, questions_per_type: int = 1) -> Example:
    """The image, its questions (``questions_per_type`` of each type) and per-patch labels."""
    rng = random.Random(seed)
    background = tuple(rng.randrange(225, 256) for _ in range(3))
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    draw = ImageDraw.Draw(image)
    labels = np.zeros((IMAGE_SIZE // PATCH, IMAGE_SIZE // PATCH), dtype=np.int64)
    cells = rng.sample(range(GRID * GRID), rng.randrange(4, 9))
    digit_cell, object_cells = cells[0], cells[1:]
    objects = []
    # distinct (colour, shape) pairs, so "the red circle" names one object
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], len(object_cells))
    for cell, (color, shape) in zip(object_cells, kinds):
        row, col = divmod(cell, GRID)
        size = rng.randrange(54, 76)
        x0 = col * CELL + rng.randrange(2, CELL - size - 1)
        y0 = row * CELL + rng.randrange(2, CELL - size - 1)
        _draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), COLORS[color])
        objects.append({"row": row, "col": col, "color": color, "shape": shape})
        label = 1 + list(COLORS).index(color) * len(SHAPES) + SHAPES.index(shape)
        labels[y0 // PATCH:(y0 + size) // PATCH + 1, x0 // PATCH:(x0 + size) // PATCH + 1] = label
    digit = rng.randrange(10)
    row, col = divmod(digit_cell, GRID)
    # bold and mid-sized: a detail a few patches wide (thin 60-pixel glyphs spread over ~12
    # patches were read at chance by the vision tower after phase-1 training)
    size = rng.randrange(36, 46)
    font = _font(size)
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font, stroke_width=DIGIT_STROKE)
    x0 = col * CELL - left + rng.randrange(3, CELL - (right - left) - 3)
    y0 = row * CELL - top + rng.randrange(3, CELL - (bottom - top) - 3)
    draw.text((x0, y0), str(digit), fill=(20, 20, 20), font=font, stroke_width=DIGIT_STROKE, stroke_fill=(20, 20, 20))
    box = draw.textbbox((x0, y0), str(digit), font=font, stroke_width=DIGIT_STROKE)
    labels[box[1] // PATCH:box[3] // PATCH + 1, box[0] // PATCH:box[2] // PATCH + 1] = (
        1 + len(COLORS) * len(SHAPES) + digit)

    questions = []
    for _ in range(questions_per_type):
        questions += _questions(rng, objects, digit, divmod(digit_cell, GRID))
    return Example(image, questions, labels.reshape(-1), objects)


def _questions(rng: random.Random, objects: list[dict], digit: int, digit_cell: tuple) -> list[Question]:
    out = []
    target = rng.choice(objects)
    cell = f"row{target['row']} col{target['col']}"
    out.append(Question("color", f"what color is at {cell} ?", target["color"], ((target["row"], target["col"]),)))
    target = rng.choice(objects)
    cell = f"row{target['row']} col{target['col']}"
    out.append(Question("shape", f"what shape is at {cell} ?", target["shape"], ((target["row"], target["col"]),)))
    color = rng.choice(list(COLORS))
    count = sum(o["color"] == color for o in objects)
    out.append(Question("count", f"how many {color} objects are there ?", str(count),
                        tuple((o["row"], o["col"]) for o in objects if o["color"] == color)))
    if rng.random() < 0.5:  # balanced yes/no
        target = rng.choice(objects)
        color, shape = target["color"], target["shape"]
    else:
        present = {(o["color"], o["shape"]) for o in objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = rng.choice(absent)
    answer = "yes" if any(o["color"] == color and o["shape"] == shape for o in objects) else "no"
    # the cell of the object asked for; none when absent (the answer then rests on every cell)
    out.append(Question("exists", f"is there a {color} {shape} ?", answer,
                        tuple((o["row"], o["col"]) for o in objects if o["color"] == color and o["shape"] == shape)))
    relation = rng.choice(["left", "above"])
    axis = "col" if relation == "left" else "row"
    pairs = [(a, b) for a in objects for b in objects if a[axis] != b[axis]]
    if not pairs:  # every object in one column (row): ask along the other axis
        relation, axis = ("above", "row") if relation == "left" else ("left", "col")
        pairs = [(a, b) for a in objects for b in objects if a[axis] != b[axis]]
    first, second = rng.choice(pairs)
    answer = "yes" if first[axis] < second[axis] else "no"
    phrase = "left of" if relation == "left" else "above"
    out.append(Question("position", f"is the {first['color']} {first['shape']} {phrase} the {second['color']} "
                                    f"{second['shape']} ?", answer,
                        ((first["row"], first["col"]), (second["row"], second["col"]))))
    out.append(Question("digit", "what digit is written ?", str(digit), (digit_cell,)))
    return out


def pixel_values(images: list[Image.Image]) -> np.ndarray:
    """CLIP normalisation of 336 x 336 images, as LLaVA-1.5's processor does for that size."""
    array = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return ((array - _mean) / _std).transpose(0, 3, 1, 2).copy()


def prompt(question: str) -> str:
    """The toy's prompt for ``question``: LLaVA-1.5's format, which its processor (no chat
    template) is trained on."""
    from ..adapters.families.llava import Llava

    return Llava().prompt(question)
