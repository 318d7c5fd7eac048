"""Budget-driven schedules: solve a recipe knob so its cost is the largest not above a budget.

A recipe may state::

    budget_tflops:
      tflops: 1.5              # the budget
      model: llava-1.5-7b      # whose cost (fico.cost.model_spec)
      text_tokens: 60
      convention: llm-viewer   # or full
      solve: r                 # the knob to solve

Integer knobs (``r``) are solved first as one count for every layer of the step, then
refined to a per-layer list (earlier layers take one more token), so the cost can come
within one token-layer of the budget. Float knobs (``ratio``, ``keep_rate``) are solved
by bisection in [0, 1]. The cost must not increase as the knob removes more tokens.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import FicoError, RecipeError
from .model import CONVENTIONS, model_spec, recipe_cost

BUDGET_KEYS = {"tflops", "model", "text_tokens", "convention", "solve"}


@dataclass
class BudgetSolution:
    """How a budget was met. ``model`` is the model the budget names; ``solved_for`` the one
    the knob was solved on (the same, or the model that runs, at the same fraction of its
    unreduced cost); ``equal_cost`` is False when that fraction could not be reached there,
    and the knob then takes the value that comes closest to it (the least cost it reaches)."""

    budget_tflops: float
    model: str
    text_tokens: int
    convention: str
    knob: str
    value: Any
    tflops: float
    fraction: float = 0.0  # budget / the named model's unreduced cost
    solved_for: str = ""
    solved_tflops: float = 0.0  # cost of the schedule on `solved_for`
    solved_fraction: float = 0.0  # that cost / its unreduced cost
    equal_cost: bool = True

    def describe(self) -> str:
        value = self.value if not isinstance(self.value, float) else round(self.value, 6)
        text = (f"budget {self.budget_tflops} TFLOPs ({self.model}, {self.text_tokens} text tokens, "
                f"{self.convention}; {self.fraction:.3f} of its unreduced cost)")
        if self.solved_for in ("", self.model):
            return f"{text}: {self.knob} = {value} -> {self.tflops:.3f} TFLOPs"
        if self.equal_cost:
            return (f"{text}, solved for {self.solved_for} at the same fraction: {self.knob} = {value} -> "
                    f"{self.solved_fraction:.3f} of its unreduced cost ({1e3 * self.solved_tflops:.3f} GFLOPs)")
        return (f"{text}: NOT equal-cost on {self.solved_for}, where no {self.knob} reaches that fraction; "
                f"the closest, {self.knob} = {value}, costs {self.solved_fraction:.3f} of its unreduced cost")

    def as_dict(self) -> dict:
        return asdict(self)


def solve_budget(config: DictConfig, source: str, overrides: list[str],
                 build: Callable[[DictConfig], Any], target: tuple[Any, int] | None = None
                 ) -> tuple[DictConfig, BudgetSolution]:
    """Return ``config`` with its ``budget_tflops.solve`` knob set, and how the budget was met.

    Args:
        target: ``(model, text_tokens)`` of the model that will run, when it is not the one
            the budget names: the knob is then solved there for the same fraction of the
            unreduced cost (a budget in TFLOPs of LLaVA-1.5-7B means nothing on another model).
    """
    budget = OmegaConf.to_container(config.budget_tflops, resolve=True)
    if not isinstance(budget, dict):
        raise RecipeError(f"{source}: budget_tflops: must be a mapping with keys {', '.join(sorted(BUDGET_KEYS))}")
    unknown = set(budget) - BUDGET_KEYS
    if unknown:
        raise RecipeError(f"{source}: budget_tflops.{sorted(unknown)[0]}: unknown key; known: {', '.join(sorted(BUDGET_KEYS))}")
    tflops, knob = budget.get("tflops"), budget.get("solve")
    if isinstance(tflops, bool) or not isinstance(tflops, (int, float)) or tflops <= 0:
        raise RecipeError(f"{source}: budget_tflops.tflops: must be a positive number, got {tflops!r}")
    if not isinstance(knob, str) or OmegaConf.select(config, knob, default=None) is None:
        raise RecipeError(f"{source}: budget_tflops.solve: must name a knob of the recipe, got {knob!r}")
    if any(item.partition("=")[0].strip() == knob for item in overrides):
        raise RecipeError(f"{source}: {knob} is solved from budget_tflops.tflops; override budget_tflops.tflops, not the knob")
    convention = budget.get("convention", "llm-viewer")
    if convention not in CONVENTIONS:
        raise RecipeError(f"{source}: budget_tflops.convention: must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    text_tokens = budget.get("text_tokens", 60)
    try:
        spec = model_spec(budget.get("model", "llava-1.5-7b"))
    except FicoError as error:
        raise RecipeError(f"{source}: budget_tflops.model: {error}") from error

    def with_value(value) -> DictConfig:
        candidate = copy.deepcopy(config)
        OmegaConf.update(candidate, knob, value, merge=False)
        return candidate

    current = OmegaConf.select(config, knob)
    if isinstance(current, bool):
        raise RecipeError(f"{source}: budget_tflops.solve: {knob} is a boolean; solve a count or a ratio")

    def solve(on, tokens: int, limit: float):
        costs: dict = {}

        def cost(value) -> float | None:
            key = tuple(value) if isinstance(value, list) else value
            if key not in costs:  # the searches revisit values
                try:
                    costs[key] = recipe_cost(on, build(with_value(value)), tokens, convention).tflops
                except RecipeError:
                    costs[key] = None  # this value cannot run (e.g. removes more tokens than exist)
            return costs[key]

        if isinstance(current, (int, list, ListConfig)):
            value = _solve_count(cost, limit, source, knob, _layers_of(config, knob, build, on))
        else:
            value = _solve_ratio(cost, limit, source, knob)
        return value, cost(value)

    value, achieved = solve(spec, text_tokens, tflops)
    fraction = tflops / recipe_cost(spec, None, text_tokens, convention).tflops
    solution = BudgetSolution(float(tflops), spec.name, text_tokens, convention, knob, value, achieved, fraction,
                              spec.name, achieved, achieved / recipe_cost(spec, None, text_tokens, convention).tflops)
    if target is not None:
        on, tokens = model_spec(target[0]), target[1]
        if on.name != spec.name:
            unreduced = recipe_cost(on, None, tokens, convention).tflops
            solution.solved_for = on.name
            try:
                value, solution.solved_tflops = solve(on, tokens, fraction * unreduced)
                solution.value = value
            except RecipeError as error:
                # that fraction is out of reach there: come as close to it as the knob can (the named
                # model's value could cost more there than a larger budget's does)
                solution.equal_cost = False
                if isinstance(error, BudgetOutOfReach) and error.least_tflops is not None:
                    value, _ = solve(on, tokens, error.least_tflops)
                    solution.value = value
                solution.solved_tflops = recipe_cost(on, build(with_value(value)), tokens, convention).tflops
            solution.solved_fraction = solution.solved_tflops / unreduced
    return with_value(value), solution


def _layers_of(config: DictConfig, knob: str, build, spec) -> int:
    """How many layers the steps that use ``${knob}`` as their count run at (0: mixed)."""
    from ..recipe.plan import plan_recipe

    raw_steps = OmegaConf.to_container(config, resolve=False).get("steps", [])
    users = {i for i, step in enumerate(raw_steps) if isinstance(step, dict) and step.get("remove") == "${" + knob + "}"}
    if not users:
        return 0
    try:
        plan = plan_recipe(build(config), spec.geometry())
    except RecipeError:
        return 0
    counts = {i: 0 for i in users}
    for planned in plan.planned_steps():
        if planned.step.index in users:
            counts[planned.step.index] += 1
    return counts.popitem()[1] if len(set(counts.values())) == 1 else 0


class BudgetOutOfReach(RecipeError):
    """No value of the solved knob meets the budget; ``least_tflops``: the least cost one
    reaches (None: no value runs), what solving for the closest reachable cost asks for."""

    def __init__(self, message: str, least_tflops: float | None):
        super().__init__(message)
        self.least_tflops = least_tflops


def _infeasible(source: str, knob: str, budget: float, best: float | None) -> BudgetOutOfReach:
    reach = f"the least it reaches is {best:.3f} TFLOPs" if best is not None else "no value of it runs"
    return BudgetOutOfReach(f"{source}: budget_tflops.tflops: {budget} cannot be met by solving {knob}: {reach}",
                            best)


def _solve_kept(cost, budget: float, source: str, knob: str) -> int:
    """The largest count within budget of a knob whose cost grows with it (``keep``)."""
    low = 0
    while cost(low) is None and low < 4096:  # the least count that runs
        low = low * 2 + 1
    if cost(low) is None or cost(low) > budget:
        raise _infeasible(source, knob, budget, cost(low))
    high = max(1, low * 2)
    while cost(high) is not None and cost(high) <= budget and high < 1 << 16:
        low, high = high, high * 2
    while high - low > 1:  # cost(low) within budget; high over it or does not run
        middle = (low + high) // 2
        value = cost(middle)
        low, high = (middle, high) if value is not None and value <= budget else (low, middle)
    return low


def _grows(cost) -> bool:
    """Whether the cost grows with the knob (a count kept) rather than falls (a count removed)."""
    runnable = [v for v in (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if cost(v) is not None][:2]
    return len(runnable) == 2 and cost(runnable[1]) > cost(runnable[0])


def _solve_count(cost, budget: float, source: str, knob: str, layers: int):
    if _grows(cost):
        return _solve_kept(cost, budget, source, knob)
    base = cost(0)
    if base is None:
        raise _infeasible(source, knob, budget, None)
    if base <= budget:
        return 0
    low, high = 0, 1  # cost(low) > budget
    while True:
        value = cost(high)
        if value is None or value <= budget or high >= 4096:
            break
        low, high = high, high * 2
    if cost(high) is None:  # shrink to the largest count that runs
        good, bad = low, high
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if cost(middle) is not None else (good, middle)
        if cost(good) > budget:
            raise _infeasible(source, knob, budget, cost(good))
        high = good
    if cost(high) > budget:
        raise _infeasible(source, knob, budget, cost(high))
    while high - low > 1:  # smallest uniform count within budget
        middle = (low + high) // 2
        low, high = (low, middle) if cost(middle) <= budget else (middle, high)
    if layers <= 1 or high == 0:
        return high
    # per-layer refinement: the first e layers take `high`, the others `high - 1`
    def schedule(e: int) -> list[int]:
        return [high] * e + [high - 1] * (layers - e)

    few, many = 0, layers  # cost(schedule(0)) > budget >= cost(schedule(layers))
    while many - few > 1:
        middle = (few + many) // 2
        value = cost(schedule(middle))
        few, many = (few, middle) if value is not None and value <= budget else (middle, many)
    return high if many == layers else schedule(many)


def _solve_ratio(cost, budget: float, source: str, knob: str) -> float:
    low, high = 0.0, 1.0
    for _ in range(60):  # shrink to the ends that run
        if cost(low) is not None:
            break
        low = (low + high) / 2 if low else 1e-9
    ends = {low: cost(low), high: cost(high)}
    if ends[high] is None:
        raise _infeasible(source, knob, budget, None)
    within = [v for v, c in ends.items() if c is not None and c <= budget]
    if not within:
        raise _infeasible(source, knob, budget, min(c for c in ends.values() if c is not None))
    # the end within budget, and the other end: bisect towards the boundary
    good = within[0] if len(within) == 1 else max(within, key=lambda v: ends[v])
    bad = high if good == low else low
    if ends[bad] is not None and ends[bad] <= budget:
        return bad if ends[bad] >= ends[good] else good
    for _ in range(60):
        middle = (good + bad) / 2
        value = cost(middle)
        if value is not None and value <= budget:
            good = middle
        else:
            bad = middle
    return good
