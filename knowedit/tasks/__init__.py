"""Prompt sets with their metrics."""
from .base import Task, per_prompt_scores, score
from .ioi import ioi_task

__all__ = ["Task", "per_prompt_scores", "score", "ioi_task"]
