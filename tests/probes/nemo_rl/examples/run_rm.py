"""PROBE, not NeMo-RL's examples/run_rm.py: see tests/probes/nemo_rl_entry.py."""
from tests.probes.nemo_rl_entry import main

main()
