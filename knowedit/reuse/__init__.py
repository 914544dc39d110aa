"""Circuit reuse: repair a target task with heads it shares with a source task (Merullo et al. 2024)."""
from .candidates import head_names, important_heads, shared_heads
from .controls import correct_answer_steering, random_same_layers, source_steering
from .persistent import distil_steering
from .presets import GPT2_MEDIUM, PRESETS, RepairPreset
from .repair import RepairResult, repair
from .roles import head_profiles
from .steering import choose_heads, rank_heads, steered_scores
from .transfer import held_out_sets, transfer_repair

__all__ = ["head_names", "important_heads", "shared_heads", "correct_answer_steering", "random_same_layers",
           "source_steering", "distil_steering", "GPT2_MEDIUM", "PRESETS", "RepairPreset", "RepairResult",
           "repair", "head_profiles", "choose_heads", "rank_heads", "steered_scores", "held_out_sets",
           "transfer_repair"]
