"""PROBE, not NeMo-RL's examples/run_grpo.py: see tests/probes/nemo_rl_entry.py."""
from tests.probes.nemo_rl_entry import main

main()
