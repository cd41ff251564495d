"""Tasks: what a model is trained and scored on (see :mod:`weatherpeft.tasks.base`)."""

from weatherpeft.tasks.base import SPLITS, Task, TaskVariables

__all__ = ["SPLITS", "Task", "TaskVariables"]
