"""The task registry: every step-3 task (prompts + data + rule rewards + warm-start text) in one place.

A task is one module that builds a :class:`Task` and calls :func:`register` once (the built-in ones are
imported by ``step3_rlhf/tasks/__init__.py``). Everything that depends on the task name reads this
registry: ``--task`` choices and the rule/task check (step3_rlhf/config.py), prompt loading
(step3_rlhf/prompt_data.py), warm-start rows (step3_rlhf/warm_start.py) and the ``--reward NAME`` rule
table (step3_rlhf/tasks/rewards.py). Adding a task = its module + one import line in ``__init__.py``
(or, from outside the package, ``register(Task(...))`` before the config is parsed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

__all__ = ["Task", "TASKS", "TaskChoices", "register", "unregister", "get_task", "task_names", "task_of_rule",
           "RewardFn"]

RewardFn = Callable[[str, str, dict], float]   # fn(prompt, response, meta) -> score


@dataclass(frozen=True)
class Task:
    """What step 3 needs to know about a task.

    * ``prompt(row, style)`` -> :class:`~step3_rlhf.tasks.prompts.TaskPrompt` (``style`` "chat" or "base");
      its ``meta`` carries what the rewards read.
    * ``load(path)`` -> rows of a local JSONL; a bad row raises one ``ValueError("{path}:{line}: field ...")``.
    * ``rewards``: rule name -> ``fn(prompt, response, meta)``; each name becomes a ``--reward`` rule that
      needs ``--task`` = this task.
    * ``solution(row)`` -> warm-start reply starting with ``<think>``; ValueError when there is none
      (the row is skipped). None: no warm start. ``search_solution(row, max_tries, seed)``: the same with
      failed attempts shown first (``warm_start.py --trace search``); None: the task has no such trace.
    * ``source(data_path, seed)`` -> ``(train rows, eval rows or None)`` for a ``--data_path`` that is not
      a local file (a generator spec, a Hub name), or None to read ``data_path`` with ``load``.
    * ``generate(n, seed, size)`` -> ``n`` generated rows (``size`` 0 = the task's mix), for
      ``warm_start.py --data_path generate``; ``size(row)`` is the row's size (``--num_count``).
    """
    name: str
    prompt: Callable[[dict, str], object]
    load: Callable[[str], list]
    rewards: dict = field(default_factory=dict)
    solution: Callable[[dict], str] | None = None
    search_solution: Callable[[dict, int, int], str] | None = None
    source: Callable[[str, int], tuple | None] | None = None
    generate: Callable[[int, int, int], list] | None = None
    size: Callable[[dict], int] | None = None
    help: str = ""


TASKS: dict[str, Task] = {}
# Names a task may not take: "preference" is the non-task prompt source, the rest are generic rules.
RESERVED = {"preference", "format", "length", "model"}


def register(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS`; a name or rule name already taken raises ValueError."""
    if task.name in TASKS or task.name in RESERVED:
        raise ValueError(f"task {task.name!r} is already registered or reserved")
    for rule in task.rewards:
        owner = task_of_rule(rule)
        if owner is not None or rule in RESERVED or ":" in rule or "=" in rule or "," in rule:
            raise ValueError(f"task {task.name!r}: reward name {rule!r} is taken or not a plain name")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASKS)}")
    return TASKS[name]


def task_names() -> list[str]:
    return list(TASKS)


def task_of_rule(rule: str) -> Task | None:
    """The task whose rewards include ``rule`` (its prompts carry that rule's answer key), or None."""
    return next((t for t in TASKS.values() if rule in t.rewards), None)


class TaskChoices:
    """A live argparse ``choices`` container: the fixed ``extra`` names plus every registered task, read
    when the flag is parsed (so a task registered after the config class was defined is accepted)."""

    def __init__(self, *extra: str):
        self.extra = extra

    def __contains__(self, name) -> bool:
        return name in self.extra or name in TASKS

    def __iter__(self):
        return iter([*self.extra, *TASKS])

    def __repr__(self) -> str:
        return repr(list(self))


def unregister(name: str) -> None:
    """Remove a task (tests that register a toy task clean up with this)."""
    TASKS.pop(name, None)
