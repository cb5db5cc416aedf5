"""PROBES, not the real programs: stand-ins at the paths of upstream entry points that cannot run here
(they need GPUs, CUDA and NVIDIA's containers). Each records what it received and checks it."""
