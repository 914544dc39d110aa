"""Circuit discovery: patching, attribution, pruning, faithfulness and overlap."""
from .ablation_scan import head_ablation_scan
from .attribution import attribution_scores
from .discover import discover
from .curves import mib_areas
from .evaluate import Evaluator, circuit_faithfulness
from .explain import explain
from .overlap import circuit_overlap
from .patching import patching_scores
from .reference import Reference

__all__ = ["head_ablation_scan", "attribution_scores", "discover", "Evaluator", "circuit_faithfulness", "explain",
           "circuit_overlap", "mib_areas", "patching_scores", "Reference"]
