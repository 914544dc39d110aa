"""Tables (CSV, Markdown, LaTeX) and the self-contained HTML report, rebuilt from saved results."""
from .build import build_report
from .tables import collateral_table, load_results, long_table, summary_table, to_latex, to_markdown, write_table

__all__ = ["build_report", "collateral_table", "load_results", "long_table", "summary_table", "to_latex",
           "to_markdown", "write_table"]
