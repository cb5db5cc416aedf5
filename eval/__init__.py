"""Held-out scoring of edit models: generation metrics on edit/validation, likelihood metrics on
edit_quality/validation, reports, plots, and checkpoint comparison (eval.run, eval.compare). Reward
scorers of either kind, local or over HTTP (eval.reward_scorers, served by eval.serve_rm), for the gold
scoring here and for the ITS loop.

Kept import-light: torch, transformers and the HTTP client load only inside the functions that use them.
"""
