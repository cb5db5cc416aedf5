"""The launcher: the layer on top that a user talks to. It imports what it launches; nothing imports it.

    launcher.__main__   `python -m launcher COMMAND` (./launch.sh forwards here): stages and commands
    launcher.run        which code runs a stage (STAGE_RUNNERS); `python -m launcher.run CONFIG` in a job
    launcher.stages     the pipeline graph from conf/pipeline/NAME.yaml, and is_finished
    launcher.pipeline   the chain run here, one stage after the other (and the smoke)
    launcher.slurm      sbatch rendering, submission with afterok, `status`
    launcher.its_job    the its stage as one SLURM job that serves its own models
    launcher.doctor     what a cluster needs for a 70B run

Kept import-light: `--help`, `--dry-run` and `plan` never import torch.
"""
