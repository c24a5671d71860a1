"""Parse ``--reward`` values and combine rule rewards into one weighted score per response.

Syntax: a list of specs (several flag values, or comma-separated in one value), each ``NAME`` or
``NAME=WEIGHT`` (weight a finite float, default 1.0; the text after the *last* ``=`` is the
weight). NAME is one of

* a task's rule (``Task.rewards`` in the registry): ``countdown`` (:func:`countdown_reward` with
  ``meta["target"]``, ``meta["nums"]``), ``countdown_steps`` (:func:`countdown_steps_reward`: the share of
  true worked steps, a dense companion to ``countdown``), ``gsm8k`` (:func:`gsm8k_reward` with
  ``meta["reference"]``);
* ``format``     - :func:`format_reward` (R1 tag layout);
* ``length``     - :func:`length_reward` with its defaults;
* ``model:PATH`` - a reward model; parsed into a :class:`ModelRewardSpec` marker, loading it is
  the trainer's job (so a module literally named ``model`` cannot be used as a custom rule);
* ``package.module:function`` - a user function ``fn(prompt: str, response: str, meta: dict) -> float``
  imported with importlib (``function`` may be dotted, e.g. ``pkg.mod:Class.method``).

Example: ``--reward countdown format=0.1 model:/ckpt/rm=0.5``.
"""
from __future__ import annotations

import importlib
import logging
import math
from dataclasses import dataclass

from step3_rlhf.tasks.format import format_reward, length_reward
from step3_rlhf.tasks.registry import TASKS, RewardFn

__all__ = ["RuleSpec", "ModelRewardSpec", "GENERIC_RULES", "rule_table", "parse_reward_specs", "split_specs",
           "RuleRewards"]

logger = logging.getLogger(__name__)

# Rules that read only the response, usable with any task.
GENERIC_RULES: dict[str, RewardFn] = {
    "format": lambda prompt, response, meta: format_reward(response),
    "length": lambda prompt, response, meta: length_reward(response),
}


def rule_table() -> dict[str, RewardFn]:
    """Every named rule: the generic ones and those of each registered task (read at parse time)."""
    table = dict(GENERIC_RULES)
    for task in TASKS.values():
        table.update(task.rewards)
    return table


@dataclass(frozen=True)
class RuleSpec:
    """A rule reward: ``name`` (as written in the flag), weight and the function to call."""
    name: str
    weight: float
    fn: RewardFn


@dataclass(frozen=True)
class ModelRewardSpec:
    """Marker for ``model:PATH``: a reward model the trainer loads itself."""
    path: str
    weight: float


def _parse_weight(text: str, spec: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise ValueError(f"reward spec {spec!r}: weight {text!r} is not a number") from None
    if not math.isfinite(weight):
        raise ValueError(f"reward spec {spec!r}: weight must be finite")
    return weight


def _import_function(name: str, spec: str) -> RewardFn:
    module_name, _, attr_path = name.partition(":")
    if not module_name or not attr_path:
        raise ValueError(f"reward spec {spec!r}: expected 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or any error raised while the module runs
        raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r}: {err}") from None
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ValueError(f"reward spec {spec!r}: {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ValueError(f"reward spec {spec!r}: {name!r} is not callable")
    return obj


def _parse_one(spec: str) -> RuleSpec | ModelRewardSpec:
    name, weight = spec, 1.0
    if "=" in spec:
        name, weight_text = spec.rsplit("=", 1)
        weight = _parse_weight(weight_text.strip(), spec)
    name = name.strip()
    if not name:
        raise ValueError(f"reward spec {spec!r}: empty name")
    if name.startswith("model:"):
        path = name[len("model:"):]
        if not path:
            raise ValueError(f"reward spec {spec!r}: 'model:' needs a path")
        return ModelRewardSpec(path=path, weight=weight)
    rules = rule_table()
    if name in rules:
        return RuleSpec(name=name, weight=weight, fn=rules[name])
    if ":" in name:
        return RuleSpec(name=name, weight=weight, fn=_import_function(name, spec))
    raise ValueError(f"reward spec {spec!r}: unknown reward {name!r}; expected one of "
                     f"{', '.join(rules)}, model:PATH or package.module:function")


def parse_reward_specs(values: list[str]) -> list[RuleSpec | ModelRewardSpec]:
    """Parse ``--reward`` values (each may hold several comma-separated specs) into specs, in order.

    Raises ValueError for an empty list, an unknown name, a bad weight, a failed import, a
    non-callable target or the same name twice.
    """
    if isinstance(values, str):
        values = [values]
    specs: list[RuleSpec | ModelRewardSpec] = []
    seen: set[str] = set()
    for value in values:
        for part in value.split(","):
            if not part.strip():
                continue
            spec = _parse_one(part.strip())
            key = f"model:{spec.path}" if isinstance(spec, ModelRewardSpec) else spec.name
            if key in seen:
                raise ValueError(f"reward {key!r} is given twice")
            seen.add(key)
            specs.append(spec)
    if not specs:
        raise ValueError("no reward given")
    return specs


def split_specs(specs: list) -> tuple[list[RuleSpec], list[ModelRewardSpec]]:
    """(rule specs, reward-model specs) of a parsed list, each in their original order."""
    return ([s for s in specs if isinstance(s, RuleSpec)], [s for s in specs if isinstance(s, ModelRewardSpec)])


class RuleRewards:
    """Weighted sum of rule rewards; a rule that fails on a response scores 0 there.

    A failure is an exception or a non-finite / non-numeric return value. Failures are counted
    in ``errors`` (total) and ``error_counts`` (per rule name) and logged once per rule, so a bad
    sample or a buggy user function never stops a training run.
    """

    def __init__(self, specs: list[RuleSpec]):
        for spec in specs:
            if not isinstance(spec, RuleSpec):
                raise ValueError(f"RuleRewards takes rule specs only, got {spec!r} (see split_specs)")
        self.specs = list(specs)
        self.errors = 0
        self.error_counts = {spec.name: 0 for spec in self.specs}

    def _score(self, spec: RuleSpec, prompt: str, response: str, meta: dict) -> float:
        try:
            value = float(spec.fn(prompt, response, meta))
            if not math.isfinite(value):
                raise ValueError(f"non-finite reward {value}")
            return value
        except Exception as err:
            if self.error_counts[spec.name] == 0:
                logger.warning("reward %r failed (scored 0; later failures counted silently): %r", spec.name, err)
            self.errors += 1
            self.error_counts[spec.name] += 1
            return 0.0

    def components(self, prompts: list[str], responses: list[str], metas: list[dict]) -> dict[str, list[float]]:
        """Unweighted score of every rule for every response, keyed by rule name (for logging)."""
        if not len(prompts) == len(responses) == len(metas):
            raise ValueError(f"prompts/responses/metas lengths differ: {len(prompts)}, {len(responses)}, {len(metas)}")
        return {spec.name: [self._score(spec, p, r, m) for p, r, m in zip(prompts, responses, metas)]
                for spec in self.specs}

    def evaluate(self, prompts: list[str], responses: list[str], metas: list[dict]):
        """(weighted totals, unweighted components) computed in one pass."""
        parts = self.components(prompts, responses, metas)
        totals = [sum(spec.weight * parts[spec.name][i] for spec in self.specs) for i in range(len(responses))]
        return totals, parts

    def __call__(self, prompts: list[str], responses: list[str], metas: list[dict]) -> list[float]:
        """Weighted sum of all rules for each response."""
        return self.evaluate(prompts, responses, metas)[0]
