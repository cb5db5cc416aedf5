"""Training stages (sft, rm, rl, dpo, feedback, select, convert) on both engines, and what they share.

Kept import-light: `python -m launcher plan` or `--dry-run` must not import torch.
"""
