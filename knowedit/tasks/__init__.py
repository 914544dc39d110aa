"""Prompt sets with their metrics."""
from .base import Task, per_prompt_scores, score
from .colored_objects import colored_objects_task
from .colored_objects_data import load_bigbench, load_cobjs
from .custom import custom_task
from .facts import facts_task
from .facts_data import load_facts
from .ioi import ioi_task
from .registry import TASKS, get_task
from .seqcont import seqcont_task
from .seqcont_data import load_seqcont

__all__ = ["Task", "per_prompt_scores", "score", "ioi_task", "colored_objects_task", "load_cobjs",
           "load_bigbench", "seqcont_task", "load_seqcont", "facts_task", "load_facts", "custom_task",
           "get_task", "TASKS"]
