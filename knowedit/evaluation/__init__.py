"""Evaluation: edit metrics (CounterFact and EasyEdit protocols), fluency, perplexity, collateral
effects on tasks, datasets, and the resumable suite runner."""
from .edit_metrics import RequestEval, aggregate_cf_s, evaluate_requests, harmonic_mean
from .fluency import generate, mean_ngram_entropy, ngram_entropy
from .perplexity import HELDOUT, perplexity
from .scoring import PairScores, score_pairs

__all__ = ["RequestEval", "aggregate_cf_s", "evaluate_requests", "harmonic_mean", "generate",
           "mean_ngram_entropy", "ngram_entropy", "HELDOUT", "perplexity", "PairScores", "score_pairs"]
