"""The image placeholders in ``input_ids``: rebuilt to each image's own feature count when a
recipe changes it, and the caller's prompt given back in ``generate``'s output."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import InputError


def padding_token_id(config) -> int:
    """The id written into the slots a rebuilt row gains as padding. Those slots are masked,
    so any id in the vocabulary does; the text config's ``pad_token_id`` (a field every text
    config class declares, possibly None) where set, else 0. The top-level config has no
    ``pad_token_id`` when built as ``LlavaConfig(text_config=...)``, so it is never read."""
    pad = getattr(config.get_text_config(), "pad_token_id", None)
    return pad if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0 else 0


def check_placeholder_runs(ids: Tensor, image_token_id: int, runs: list[int], counted_by: str) -> None:
    """Each sample's placeholders are whole runs of its images' counts ``runs``, in order (the
    model checks only the batch's total, so a mismatch per image would pass it silently);
    InputError naming what ``counted_by`` the counts, else."""
    per_sample = (ids == image_token_id).sum(1).tolist()
    image, ok = 0, True
    for count in per_sample:
        while count > 0 and image < len(runs):
            count -= runs[image]
            image += 1
        ok &= count == 0
    if not ok or image != len(runs):
        raise InputError(f"fico: the placeholders in input_ids ({per_sample} per sample) do not match the "
                         f"images' token counts ({runs}, by {counted_by}); pass the processor's outputs unchanged")


def rebuild_placeholders(call: dict, counts: list[int], image_token_id: int, per_image: int | list[int],
                         pad_id: int) -> dict:
    """``call`` with image i's run of placeholders (``per_image`` tokens, or ``per_image[i]`` where
    images differ) made ``counts[i]`` tokens long (cut, or extended at its end where a method
    emits more features than patches, such as PruMerge's extra token when it discards
    nothing); images in the order the model fills them (by sample, then left to right), rows
    padded back to one length on the side the batch was padded (left unless it is right-padded)."""
    ids = call["input_ids"]
    b, length = ids.shape
    placeholder = ids == image_token_id
    overall = (placeholder.reshape(-1).long().cumsum(0) - 1).reshape(b, length)  # rank over the batch
    if isinstance(per_image, int):
        image_of = (overall // per_image).clamp(0, len(counts) - 1)
        rank = overall % per_image
        run = torch.full_like(overall, per_image)
    else:
        runs = torch.tensor(per_image, device=ids.device, dtype=torch.long)
        ends = runs.cumsum(0)
        image_of = torch.bucketize(overall, ends, right=True).clamp(0, len(counts) - 1)
        rank = overall - (ends - runs)[image_of]
        run = runs[image_of]
    count = torch.tensor(counts, device=ids.device, dtype=torch.long)[image_of]
    # how many times each position appears in the rebuilt row
    repeats = torch.where(placeholder, (rank < count).long(), 1)
    last = placeholder & (rank == run - 1)
    repeats = repeats + torch.where(last, (count - run).clamp_min(0), 0)
    if bool((repeats == 1).all()):
        return call
    sources = [torch.repeat_interleave(torch.arange(length, device=ids.device), repeats[row]) for row in range(b)]
    return rows_from_sources(call, sources, pad_id)[0]


def rebuild_kept_placeholders(call: dict, kept: list[Tensor], image_token_id: int, runs: list[int], pad_id: int
                              ) -> tuple[dict, Tensor]:
    """``call`` with image i's run of ``runs[i]`` placeholders replaced by the placeholders at
    ranks ``kept[i]`` of that run (a token a compressor created takes its anchor's rank), and
    ``(B, L')`` the index in the caller's row of each position of the rebuilt row (-1: padding
    added). Every 2-D input (``input_ids``, masks, ``mm_token_type_ids``) follows; images in the
    order the model fills them, each one's run contiguous, as processors write them."""
    ids = call["input_ids"]
    sources, image = [], 0
    for row in ids:
        where = (row == image_token_id).nonzero()[:, 0].tolist()
        pieces, cursor, first = [], 0, 0
        while first < len(where):
            start = where[first]
            pieces += [torch.arange(cursor, start, device=ids.device), start + kept[image].to(ids.device)]
            cursor = start + runs[image]
            first += runs[image]
            image += 1
        pieces.append(torch.arange(cursor, ids.shape[1], device=ids.device))
        sources.append(torch.cat(pieces))
    return rows_from_sources(call, sources, pad_id)


def rows_from_sources(call: dict, sources: list[Tensor], pad_id: int) -> tuple[dict, Tensor]:
    """``call`` with each 2-D input's row b made of its entries at ``sources[b]`` (its padding
    left out), rows padded to the longest on the side the batch was padded (left unless it is
    right-padded); and
    ``(B, L')`` each new position's source (-1 where padding was added)."""
    ids = call["input_ids"]
    b = ids.shape[0]
    mask = call.get("attention_mask")
    right = mask is not None and bool((mask[:, -1] == 0).any()) and not bool((mask[:, 0] == 0).any())
    if mask is not None:  # the old padding goes: the rows are padded anew to the longest
        sources = [source[mask[row, source].bool()] for row, source in enumerate(sources)]
    lengths = torch.tensor([len(s) for s in sources], device=ids.device)
    width = int(lengths.max())
    offset = torch.zeros_like(lengths) if right else width - lengths
    where = torch.full((b, width), -1, dtype=torch.long, device=ids.device)
    for row, source in enumerate(sources):
        start = int(offset[row])
        where[row, start:start + len(source)] = source
    new = dict(call)
    for key, fill in (("input_ids", pad_id), ("attention_mask", 0), ("labels", -100), ("token_type_ids", 0),
                      ("mm_token_type_ids", 0)):
        value = call.get(key)
        if value is None or value.dim() != 2 or value.shape != ids.shape:
            continue
        out = value.new_full((b, width), fill)
        for row, source in enumerate(sources):
            start = int(offset[row])
            out[row, start:start + len(source)] = value[row, source]
        new[key] = out
    if mask is None and bool((lengths != width).any()):
        new["attention_mask"] = (torch.arange(width, device=ids.device)[None] >= offset[:, None]) if not right else \
            (torch.arange(width, device=ids.device)[None] < lengths[:, None])
        new["attention_mask"] = new["attention_mask"].long()
    return new, where


def restore_prompt(out, original_ids: Tensor, shrunk_length: int):
    """Give generate's output the caller's original prompt, so slicing by its length works."""
    def fix(sequences: Tensor) -> Tensor:
        return torch.cat([original_ids.to(sequences.device), sequences[:, shrunk_length:]], dim=1)

    if isinstance(out, Tensor):
        return fix(out)
    if hasattr(out, "sequences"):
        out.sequences = fix(out.sequences)
    return out
