"""Circuit discovery: patching, attribution, pruning, faithfulness and overlap."""
from .ablation_scan import head_ablation_scan

__all__ = ["head_ablation_scan"]
