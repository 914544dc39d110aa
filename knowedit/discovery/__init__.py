"""Circuit discovery: patching, attribution, pruning, faithfulness and overlap."""
from .ablation_scan import head_ablation_scan
from .attribution import attribution_scores
from .discover import discover
from .evaluate import Evaluator
from .patching import patching_scores
from .reference import Reference

__all__ = ["head_ablation_scan", "attribution_scores", "discover", "Evaluator", "patching_scores", "Reference"]
