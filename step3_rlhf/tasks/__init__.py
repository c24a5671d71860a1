"""Step-3 tasks (R1-Zero style: Countdown, GSM8K) and rule rewards. Pure Python, no torch.

One module per task (countdown.py, gsm8k.py: prompt, loader, rewards, warm-start text, optional
generator/solver), each registering a :class:`Task` in :data:`TASKS` (registry.py). Shared pieces:
prompts.py (the R1 prompt layout, JSONL rows), format.py (answer tags, format and length rewards),
safe_arith.py (evaluating model arithmetic without eval), rewards.py (``--reward`` specs and their
weighted sum). To add a task: write its module and add one import line below.
"""
from step3_rlhf.tasks.registry import TASKS, Task, TaskChoices, get_task, register, task_names, task_of_rule, unregister
from step3_rlhf.tasks import countdown, gsm8k  # noqa: F401,E402 - built-in tasks register themselves on import

__all__ = ["TASKS", "Task", "TaskChoices", "get_task", "register", "unregister", "task_names", "task_of_rule"]
