"""Edit datasets: CounterFact and zsRE loaders, downloads with checksums, known-fact selection."""
from .known import known_records
from .loaders import LOADERS, SOURCES, load_counterfact, load_dataset, load_zsre

__all__ = ["LOADERS", "SOURCES", "load_counterfact", "load_dataset", "load_zsre", "known_records"]
