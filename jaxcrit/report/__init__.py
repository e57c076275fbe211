"""Reporting: atomic file writers, run manifests, plots, heatmaps and text summaries.

Pure Python / numpy / matplotlib (Agg) over result records; neurons are named by
jaxcrit.models.sites.neuron_name; jax is imported only by `io.manifest`, lazily.
"""
from jaxcrit.report.io import (manifest, read_json, write_csv, write_json, write_png,
                               write_text)
from jaxcrit.report.heatmaps import site_heatmap
from jaxcrit.report.plots import phase_curve, scan_distribution
from jaxcrit.report.summary import fmt_ppl_log10, summary_markdown, terminal_table

__all__ = [
    "write_json", "write_csv", "write_text", "write_png", "read_json", "manifest",
    "phase_curve", "site_heatmap", "scan_distribution",
    "summary_markdown", "terminal_table", "fmt_ppl_log10",
]
