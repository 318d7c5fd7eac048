"""How fico's stage cost grows with the visual-token count: two ``fico bench --json`` reports of
the same recipes on models that differ in their token counts (the LLaVA-1.5-shaped model's
576 and the LLaVA-NeXT-shaped model's 2928), side by side.

    python -m fico.commands.growth docs/bench_shaped_defaults.json docs/bench_shaped_next.json \\
        --write docs/benchmarks.md

For each recipe: the visual tokens entering the language model, the median seconds of its
stages (``stage_share`` x the median prefill) and their share of the reduced prefill, on each
model, and the growth of the stage time against the growth of the visual tokens.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BLOCK = "stage-growth"


def _stage_ms(entry: dict) -> float | None:
    share, prefill = entry.get("stage_share"), entry.get("prefill_ms")
    return None if share is None or prefill is None else share * prefill


def growth_rows(small: dict, large: dict) -> list[dict]:
    """One row per recipe present in both reports."""
    by_name = {e["recipe"]: e for e in large["results"]}
    tokens = (small["baseline"]["image_features"], large["baseline"]["image_features"])
    rows = []
    for entry in small["results"]:
        other = by_name.get(entry["recipe"])
        if other is None:
            continue
        ms = (_stage_ms(entry), _stage_ms(other))
        rows.append({"recipe": entry["recipe"], "tokens": tokens, "stage_ms": ms,
                     "share": (entry.get("stage_share"), other.get("stage_share")),
                     "growth": None if None in ms or not ms[0] else ms[1] / ms[0]})
    return rows


def _cell(value: float | None, digits: int, scale: float = 1.0) -> str:
    return "unreadable" if value is None else f"{value * scale:.{digits}f}"


def markdown(small: dict, large: dict, command: str) -> str:
    rows = growth_rows(small, large)
    n0, n1 = small["baseline"]["image_features"], large["baseline"]["image_features"]
    lines = [f"<!-- bench:{BLOCK}:begin -->",
             f"From `{small['model']}` ({small['date']}, {small['architecture']}) and `{large['model']}` "
             f"({large['date']}, {large['architecture']}), {small['machine']}; unreduced images give {n0} and "
             f"{n1} visual tokens ({n1 / n0:.2f} x). By:", "", f"    {command}", "",
             f"| recipe | stages ms at {n0} | % of prefill | stages ms at {n1} | % of prefill | stage time growth |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['recipe']} | {_cell(row['stage_ms'][0], 1)} | {_cell(row['share'][0], 1, 100)} | "
                     f"{_cell(row['stage_ms'][1], 1)} | {_cell(row['share'][1], 1, 100)} | "
                     f"{_cell(row['growth'], 1)} x |")
    lines.append(f"<!-- bench:{BLOCK}:end -->")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("small", help="fico bench --json report at the smaller token count")
    parser.add_argument("large", help="the same recipes at the larger token count")
    parser.add_argument("--write", default=None, help="update this markdown file's stage-growth block")
    args = parser.parse_args(argv)
    small, large = (json.loads(Path(p).read_text()) for p in (args.small, args.large))
    command = f"python -m fico.commands.growth {args.small} {args.large}" + (
        f" --write {args.write}" if args.write else "")
    block = markdown(small, large, command)
    print(block)
    if args.write:
        from .bench import write_markdown

        write_markdown(Path(args.write), block, BLOCK)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
