"""Held-out scoring of edit models: generation metrics on edit/validation, likelihood metrics on
edit_quality/validation, reports, plots, and checkpoint comparison (eval.run, eval.compare).

Kept import-light: torch, transformers and the HTTP client load only inside the functions that use them.
"""
