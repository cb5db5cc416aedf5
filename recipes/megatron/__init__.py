"""The Megatron engine: parallel plans (plan.py), Megatron-Bridge SFT (bridge_sft.py), NeMo-RL reward
model / RLOO / DPO (nemo_rl.py) and HF <-> Megatron checkpoint conversion (convert.py).

Import-light on purpose: nothing here imports megatron, torch or NVIDIA's frameworks at module load.
Each stage module exposes `build_command(cfg) -> list[str]` (the command a SLURM job runs) and
`render(cfg) -> dict[path, text]` (the files that command reads), plus `run(cfg)`.
"""
