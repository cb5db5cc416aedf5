"""Training stages (sft, rm, rl, dpo, convert), the pipeline and its launchers.

Kept import-light: `python -m recipes plan` or `--dry-run` must not import torch.
"""
