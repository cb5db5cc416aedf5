"""SLURM executor: render an sbatch script per stage, submit it, chain the pipeline, report status.

    ./launch.sh STAGE executor=slurm cluster=NAME [key=value ...] [--dry-run]
    ./launch.sh pipeline executor=slurm cluster=NAME [key=value ...] [--dry-run]
    ./launch.sh status RUN_DIR          (launcher/status.py)

Files, all under RUN_DIR/slurm/ (beside the stage outputs, never inside them):
    STAGE.sbatch      the rendered batch script (`sbatch` it again by hand if you like)
    STAGE.yaml        the stage's resolved config, frozen at submission: the job runs exactly this,
                      even if conf/ changes while it waits in the queue
    STAGE-JOBID.log   the job's output (appended across requeues)
RUN_DIR/jobs.json     stage -> job id, script, log, out (read by `status`)

Inside the job (see `launch_block`):
  - HF engine: one task per node runs `accelerate launch` with the machine rank, the first node as
    main process and nodes x processes-per-node processes (a single process runs without accelerate);
  - Megatron engine (Megatron-Bridge sft, convert): one task per GPU; each task's RANK, WORLD_SIZE,
    LOCAL_RANK come from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR is the first node;
  - NeMo-RL stages (rm, rl, dpo on engine=megatron): a Ray head on the first node and a Ray worker on
    each other node (the layout of NeMo-RL's ray.sub), then the stage command on the head node.
Preemption: `--signal=B:USR1@cluster.signal_seconds` and `--requeue`. The script's USR1 trap asks the
stage to checkpoint (recipes/preemption.py); a stage that exits with PREEMPTED_EXIT_CODE is requeued with
`scontrol requeue` and resumes from its latest checkpoint (resume=auto).
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

from omegaconf import OmegaConf

from recipes import preemption
from recipes.config import REPO_ROOT, ConfigError, RunConfig, to_yaml, validate
from hs3.io import UserError, atomic_write_json, atomic_write_text

NEMO_RL_STAGES = ("rm", "rl", "dpo")  # on engine=megatron: NeMo-RL, driven through Ray
RAY_PORT = 6379


# ---- what a stage's job looks like ------------------------------------------------------------

def launch_kind(cfg) -> str:
    """hf | megatron | nemo_rl | single (one process: data, eval, convert)."""
    if cfg.stage in ("data", "eval", "convert", "its"):
        return "single"
    if cfg.engine == "megatron":
        return "nemo_rl" if cfg.stage in NEMO_RL_STAGES else "megatron"
    return "hf"


def entry_name(cfg) -> str:
    """The pipeline entry's name (two convert or eval entries share a stage in one run dir), else the stage:
    what the job's files, its jobs.json key and its SLURM job name are called."""
    return cfg.get("name") or cfg.stage


def job_files(cfg) -> dict[str, Path]:
    base = Path(cfg.run_dir).resolve() / "slurm"
    name = entry_name(cfg)
    return {"script": base / f"{name}.sbatch", "config": base / f"{name}.yaml", "log": base / f"{name}-%j.log"}


def job_config(cfg):
    """The config the job runs: executor=local (run here, don't submit again), not a dry run, and,
    on GPU nodes, one HF process per GPU (re-validated: the global batch must still divide)."""
    job = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.to_container(cfg, resolve=True))
    job.executor = "local"
    job.dry_run = False
    if launch_kind(cfg) == "single":
        job.cluster.nodes = 1
    hf_on_gpus = launch_kind(cfg) == "hf" and cfg.cluster.gpus_per_node > 0
    if hf_on_gpus:
        job.hf.num_processes = cfg.cluster.gpus_per_node
        layout = rollout_server(cfg)
        if layout:  # rl.vllm=server: some GPUs serve the rollouts, the rest train (recipes.rl.server_layout)
            job.hf.num_processes, job.rl.vllm_server_url = len(layout["train"]), layout["url"]
    try:
        validate(job)
    except ConfigError as exc:
        if not hf_on_gpus:
            raise
        raise ConfigError(f"{exc}; the job runs one process per GPU on {cfg.cluster.nodes} node(s) x "
                          f"{cfg.cluster.gpus_per_node} GPUs (change gbs=, mbs= or nodes=)") from None
    return job


def rollout_server(cfg) -> dict | None:
    """rl's vLLM rollout server started by the job (recipes.rl.server_layout), or None."""
    if cfg.stage != "rl" or launch_kind(cfg) != "hf" or cfg.cluster.gpus_per_node <= 0:
        return None
    from recipes.rl import server_layout

    return server_layout(cfg)


def rollout_server_block(cfg, layout: dict) -> str:
    """Start the rollout server on its GPUs as a job step beside the training, and wait until it answers."""
    from recipes.rl import VLLM_SERVER_ENV, vllm_server_command

    serve = ",".join(map(str, layout["serve"]))
    env = " ".join(f"{k}={v}" for k, v in {**VLLM_SERVER_ENV, "CUDA_VISIBLE_DEVICES": serve}.items())
    body = f"export {env}; exec " + shell_join(vllm_server_command(cfg, layout["port"]))
    log = shlex.quote(str(Path(cfg.out).resolve() / "vllm_server.log"))
    health = f"http://127.0.0.1:{layout['port']}/health"
    return "\n".join([
        f"# rl rollouts (rl.vllm=server): a vLLM server on GPUs {serve} (tensor parallel {len(layout['serve'])}), "
        f"training on GPUs {','.join(map(str, layout['train']))}",
        f"{srun_prefix(cfg, '--overlap', '--nodes=1', '--ntasks=1')} \\",
        f"    {in_task(cfg, body)} > {log} 2>&1 &",
        "VLLM_SERVER_PID=$!",
        f"until curl -sf {health} >/dev/null; do",
        f'  kill -0 "$VLLM_SERVER_PID" 2>/dev/null || {{ echo "[hs3] the vLLM server exited (log: {log})"; exit 1; }}',
        "  sleep 5",
        "done",
        f'echo "[hs3] vLLM rollout server up at {layout["url"]}"',
        ""])


def container_image(cfg) -> str | None:
    """Megatron stages run in the Megatron engine's pinned containers (Megatron-Bridge for sft and
    convert, NeMo-RL for rm/rl/dpo and for a NeMo-RL checkpoint's export, whose converters are NeMo-RL's)
    when it names them; everything else (data, eval, its: our own code and its dependencies, which those
    images do not carry) in cluster.container_image."""
    from recipes.megatron import STAGE_MODULES

    if cfg.engine == "megatron" and cfg.stage in STAGE_MODULES:
        nemo_rl = launch_kind(cfg) == "nemo_rl" or (cfg.stage == "convert" and cfg.megatron.convert_direction == "nemo_rl_to_hf")
        pinned = cfg.megatron.get("nemo_rl_container") if nemo_rl else None
        if pinned or cfg.megatron.container:
            return pinned or cfg.megatron.container
    return cfg.cluster.container_image or None


def srun_prefix(cfg, *srun_args: str) -> str:
    """`srun ARGS [--container-image ... --container-mounts ...]`: pyxis/enroot flags when the stage
    runs in a container (the repo and the run dir are mounted at the same paths). Every argument is
    quoted for the shell (a path with a space stays one argument, `$(...)` in a path stays text); only
    the launcher's own variables ("--exclude=$MASTER_ADDR") expand, see shell_join."""
    parts = ["srun", *srun_args]
    image = container_image(cfg)
    if image:
        mounts = list(cfg.cluster.container_mounts)
        for path in (str(REPO_ROOT), str(Path(cfg.run_dir).resolve())):
            if any(c in path for c in ",:"):  # pyxis splits --container-mounts on both
                raise ConfigError(f"{path!r} cannot be mounted into the container (pyxis --container-mounts "
                                  f"splits on ',' and ':'); use a run_dir without them")
            if not any(m.split(":")[0] == path or path.startswith(m.split(":")[0] + "/") for m in mounts):
                mounts.append(f"{path}:{path}")
        parts += [f"--container-image={image}", f"--container-mounts={','.join(mounts)}",
                  f"--container-workdir={REPO_ROOT}", "--no-container-mount-home"]
    return shell_join(parts)


def task_setup(cfg) -> str:
    """Shell lines every task runs before the stage: the cluster's `setup`, else the repo's venv."""
    lines = list(cfg.cluster.setup)
    if not lines and not container_image(cfg):
        lines = [f"source {shlex.quote(str(REPO_ROOT / '.venv' / 'bin' / 'activate'))}"]
    return "; ".join([f"cd {shlex.quote(str(REPO_ROOT))}", *lines])


def stage_command(cfg, config_file: Path) -> list[str]:
    """The stage's command: the Megatron engine's own (it renders its files into cfg.out first), else
    one process of the stage running the frozen config."""
    if cfg.stage == "its":  # launcher/its_job.py: one model server per local model inside the job
        from launcher.its_job import job_command

        return job_command(cfg, config_file)
    if launch_kind(cfg) in ("megatron", "nemo_rl") or (cfg.engine == "megatron" and cfg.stage == "convert"):
        from recipes.megatron import build_command

        return list(build_command(cfg))
    return ["python", "-m", "launcher.run", str(config_file)]


def job_shape(cfg) -> tuple[int, int]:
    """(nodes, GPUs per node) the job asks for: the Megatron plan's when it names them."""
    if launch_kind(cfg) == "single":
        return 1, (0 if cfg.stage == "data" else cfg.cluster.gpus_per_node)
    if cfg.engine == "megatron":
        from recipes.megatron import job_nodes

        return job_nodes(cfg)
    return cfg.cluster.nodes, cfg.cluster.gpus_per_node


def is_torchrun(command: list[str] | str) -> bool:
    return isinstance(command, list) and Path(command[0]).name == "torchrun"


def tasks_per_node(cfg, command: list[str] | str) -> int:
    """Megatron without torchrun: one task per GPU; everything else: one task per node."""
    if launch_kind(cfg) == "megatron" and not is_torchrun(command):
        return max(job_shape(cfg)[1], 1)
    return 1


# The launcher's own variables, the only text that expands in a rendered command: an argument that is
# exactly one of them, optionally after `--flag=` and before `:PORT` (`--exclude=$MASTER_ADDR`,
# `$RAY_HEAD_IP:6379`). Anything else, paths from the config included, is single-quoted: never expanded.
EXPANDED = ("MASTER_ADDR", "MASTER_PORT", "SLURM_NODEID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS",
            "SLURM_JOB_ID", "RAY_HEAD_IP", "RAY_CPUS", "RAY_DIR")
_EXPANDED_ARG = re.compile(r"(--[\w-]+=)?\$(%s)(:\d+)?" % "|".join(EXPANDED))


def shell_join(args: list[str] | str) -> str:
    """shlex.join, except that an argument that is one of the launcher's variables (EXPANDED) is
    double-quoted, so that the shell expands it (and it stays one word)."""
    if isinstance(args, str):
        return args
    def quote(arg: str) -> str:
        if _EXPANDED_ARG.fullmatch(arg):
            return '"' + arg + '"'
        return shlex.quote(arg)
    return " ".join(quote(a) for a in args)


def in_task(cfg, body: str) -> str:
    """`bash -c '...'`, single-quoted so that $SLURM_* expand inside each task, not in the batch script."""
    return "bash -c " + shlex.quote(f"{task_setup(cfg)}; {body}")


def launch_block(cfg, config_file: Path, command: list[str] | str) -> str:
    """The lines that start the stage in the background (its PID in STAGE_PID)."""
    kind = launch_kind(cfg)
    nodes, gpus = job_shape(cfg)
    if kind == "single":
        return f"{srun_prefix(cfg, '--nodes=1', '--ntasks=1')} \\\n    {in_task(cfg, 'exec ' + shell_join(command))} &"
    if kind == "megatron":
        per_node = tasks_per_node(cfg, command)
        srun = srun_prefix(cfg, f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--kill-on-bad-exit=1")
        if is_torchrun(command):  # torchrun on each node starts that node's ranks (one GPU per node too)
            return (f"# one torchrun per node: {nodes} nodes x {max(gpus, 1)} GPUs\n"
                    f"{srun} \\\n    {in_task(cfg, 'exec ' + shell_join(command))} &")
        ranks = "export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID; "
        return (f"# one task per GPU: {nodes} nodes x {per_node} = {nodes * per_node} ranks\n"
                f"{srun} \\\n    {in_task(cfg, ranks + 'exec ' + shell_join(command))} &")
    if kind == "hf":
        from recipes.training import CHILD_ENV, accelerate_command

        per_node = gpus if gpus > 0 else cfg.hf.num_processes
        layout, serve_block = rollout_server(cfg), ""
        if layout:  # the job's own vLLM rollout server on the first GPUs; the stage trains on the others
            per_node, serve_block = len(layout["train"]), rollout_server_block(cfg, layout)
        if nodes * per_node == 1 and not cfg.hf.accelerate_config:
            body = "exec " + shell_join(command)
        else:  # the $VARIABLES expand inside each task: its node's rank, the first node's address
            if gpus == 0 and nodes > 1 and not cfg.hf.accelerate_config:
                raise ConfigError(f"{cfg.stage} on {nodes} CPU nodes needs hf.accelerate_config (e.g. "
                                  "conf/accelerate/zero3_cpu.yaml): without one accelerate starts an independent "
                                  "process per node")
            accelerate = accelerate_command(config_file, per_node, cfg.hf.accelerate_config, nodes,
                                            machine_rank="$SLURM_NODEID", main_process_ip="$MASTER_ADDR",
                                            main_process_port="$MASTER_PORT", multi_gpu=gpus > 0)
            body = f"export {CHILD_ENV}=1; exec " + shell_join(["python", *accelerate[1:]])
        if layout:
            body = f"export CUDA_VISIBLE_DEVICES={','.join(map(str, layout['train']))}; " + body
        return (f"{serve_block}# one task per node, each starting {per_node} process(es): {nodes * per_node} in all\n"
                f"{srun_prefix(cfg, f'--nodes={nodes}', f'--ntasks={nodes}', '--ntasks-per-node=1', '--kill-on-bad-exit=1')} \\\n"
                f"    {in_task(cfg, body)} &")
    return ray_block(cfg, shell_join(command))


def ray_block(cfg, command: str) -> str:
    """NeMo-RL: Ray head on the first node, a worker per other node (as NeMo-RL's ray.sub lays them
    out), the stage command on the head once every node's GPUs have joined; ENDED stops the workers.
    As in ray.sub (NeMo-RL v0.7.0): the head's address is the first node's IP, not its hostname
    (ray.sub:271-313 resolves each node with host/getent, falling back to the name), and each Ray node
    gets its whole node: the job is --exclusive (ray.sub:3) and each Ray srun and `ray start` gets the
    node's CPUTot (ray.sub:64-93, 860, 876), not cluster.cpus_per_task."""
    nodes, gpus = job_shape(cfg)
    gpus = max(gpus, 1)
    ray_dir = '"$RAY_DIR"'
    ray_start = f'--num-cpus="$RAY_CPUS" --num-gpus={gpus} --disable-usage-stats'
    # a worker that cannot join says so (WORKER_FAILED): the head stops waiting for its GPUs and fails
    head = (f'ray start --head --node-ip-address="$RAY_HEAD_IP" --port={RAY_PORT} {ray_start} || '
            f'{{ touch "$RAY_DIR/ENDED"; exit 1; }}; touch "$RAY_DIR/STARTED_RAY_HEAD"; '
            f"until python -c \"import ray; ray.init(address='auto'); import sys; "
            f"sys.exit(ray.cluster_resources().get('GPU', 0) < {nodes * gpus})\" 2>/dev/null; do "
            f'if [ -f "$RAY_DIR/WORKER_FAILED" ]; then echo "[hs3] a Ray worker failed to start" >&2; '
            f'touch "$RAY_DIR/ENDED"; ray stop; exit 1; fi; sleep 5; done; '
            f'{command}; rc=$?; touch "$RAY_DIR/ENDED"; ray stop; exit $rc')
    worker = (f'until [ -f "$RAY_DIR/STARTED_RAY_HEAD" ] || [ -f "$RAY_DIR/ENDED" ]; do sleep 2; done; '
              f'[ -f "$RAY_DIR/ENDED" ] && exit 1; '
              f'ray start --address="$RAY_HEAD_IP:{RAY_PORT}" {ray_start} || '
              f'{{ touch "$RAY_DIR/WORKER_FAILED"; exit 1; }}; '
              f'until [ -f "$RAY_DIR/ENDED" ]; do sleep 5; done; ray stop')
    cpus = "'s/.*CPUTot=\\([0-9]*\\).*/\\1/p'"
    lines = [f"# NeMo-RL: Ray cluster over {nodes} node(s), {nodes * gpus} GPUs; the stage runs on the head node",
             "# The head's IP (Ray binds to an address, not a name; as ray.sub: host, else getent, else the name)",
             'RAY_HEAD_IP=$(host "$MASTER_ADDR" 2>/dev/null | awk \'/has address/ { print $4; exit }\' || true)',
             '[ -n "$RAY_HEAD_IP" ] || RAY_HEAD_IP=$(getent hosts "$MASTER_ADDR" | awk \'{ print $1; exit }\' || true)',
             'export RAY_HEAD_IP=${RAY_HEAD_IP:-$MASTER_ADDR}',
             "# Each Ray node claims its node's CPUs (CPUTot of the first node; the nodes are alike)",
             f'export RAY_CPUS=$(scontrol show node "$MASTER_ADDR" -o | sed -n {cpus})',
             '[ -n "$RAY_CPUS" ] || { echo "[hs3] cannot read CPUTot of $MASTER_ADDR from scontrol" >&2; exit 1; }',
             f"export RAY_DIR={shlex.quote(str(job_files(cfg)['script'].parent))}/ray-$SLURM_JOB_ID",
             f"rm -rf {ray_dir}; mkdir -p {ray_dir}"]
    if nodes > 1:
        worker_srun = srun_prefix(cfg, f'--nodes={nodes - 1}', f'--ntasks={nodes - 1}', '--ntasks-per-node=1',
                                  '--cpus-per-task=$RAY_CPUS', '--exclude=$MASTER_ADDR')
        lines.append(f"{worker_srun} \\\n    {in_task(cfg, worker)} &")
    head_srun = srun_prefix(cfg, '--nodes=1', '--ntasks=1', '--cpus-per-task=$RAY_CPUS', '-w', '$MASTER_ADDR', '--overlap')
    lines.append(f"{head_srun} \\\n    {in_task(cfg, head)} &")
    return "\n".join(lines)


def wandb_key_lines(cfg) -> str:
    """train.report_to=wandb: W&B's key reaches the tasks through the environment, like HF_TOKEN: WANDB_API_KEY
    when it is set, else the login's `wandb login` entry (machine api.wandb.ai in $NETRC or ~/.netrc), read on
    the host into the environment, never into a file (the containers do not mount $HOME)."""
    if "wandb" not in [v.strip() for v in str(cfg.train.report_to).split(",")]:
        return ""
    return ("# W&B (train.report_to=wandb): the key of your `wandb login`, through the environment only\n"
            'if [ -z "${WANDB_API_KEY:-}" ] && [ -r "${NETRC:-$HOME/.netrc}" ]; then\n'
            "  WANDB_API_KEY=$(awk '{for (i = 1; i <= NF; i++) { if ($i == \"machine\") m = $(i + 1); "
            "if ($i == \"password\" && m == \"api.wandb.ai\") { print $(i + 1); exit } }}' \"${NETRC:-$HOME/.netrc}\")\n"
            "  export WANDB_API_KEY\nfi\n"
            '[ -n "${WANDB_API_KEY:-}" ] || echo "[hs3] note: no WANDB_API_KEY and no wandb login: W&B will not log"\n')


def render_script(cfg, command: list[str] | str | None = None) -> str:
    """The sbatch script of one stage (pure: same config -> same text). `command` replaces the stage's
    own command inside the same launch layout (to probe a cluster's environment)."""
    c = cfg.cluster
    kind = launch_kind(cfg)
    files = job_files(cfg)
    for path in (str(Path(cfg.run_dir).resolve()), str(Path(cfg.out).resolve())):
        # #SBATCH lines take a double-quoted value; a line break would end a comment or an #SBATCH line
        if any(ch in path for ch in '"\n\r'):
            raise ConfigError(f"run_dir/out {path!r} contains a double quote or a line break (not usable in a batch script)")
    out = Path(cfg.out).resolve()
    command = command or stage_command(cfg, files["config"])
    nodes, gpus = job_shape(cfg)
    sbatch = [f"--job-name=hs3-{entry_name(cfg)}"]
    for key in ("account", "partition", "qos"):
        if c[key]:
            sbatch.append(f"--{key}={c[key]}")
    sbatch += [f"--time={c.time}", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node(cfg, command)}"]
    if gpus > 0 and c.request_gpus:
        sbatch.append(f"--gpus-per-node={gpus}")
    if kind == "nemo_rl":  # Ray nodes take whole nodes (ray.sub:3); cpus_per_task does not limit them
        if "--exclusive" not in c.extra_sbatch:
            sbatch.append("--exclusive")
    elif c.cpus_per_task:
        sbatch.append(f"--cpus-per-task={c.cpus_per_task}")
    if c.mem:
        sbatch.append(f"--mem={c.mem}")
    sbatch += [f'--output="{files["log"]}"', "--open-mode=append",
               f"--signal=B:USR1@{c.signal_seconds}", "--requeue", "--kill-on-invalid-dep=yes",
               *c.extra_sbatch]
    image = container_image(cfg)
    code = preemption.PREEMPTED_EXIT_CODE
    if cfg.stage in preemption.TRAINING_STAGES:
        request = (f'echo "[hs3] USR1 at $(date -u +%FT%TZ): asking the stage to checkpoint and stop"\n'
                   f'  touch "$OUT/{preemption.PREEMPT_REQUEST_FILE}"')
        if kind == "megatron":  # Megatron-Bridge's exit signal handler checkpoints and stops on SIGTERM
            request += '\n  scancel --signal=TERM "$SLURM_JOB_ID"  # the job steps\' tasks, not this script'
    else:  # nothing to checkpoint: the stage runs on until the limit
        request = f'echo "[hs3] USR1 at $(date -u +%FT%TZ): {cfg.stage} has no checkpoint; it may hit the time limit"'
    return f"""#!/bin/bash
# {cfg.stage} (engine={cfg.engine}, {kind} launch) for run_dir={shlex.quote(str(cfg.run_dir))}
# Rendered by launcher/slurm.py from conf/cluster/{c.name}.yaml; the job runs the frozen config
# {files['config']}
{chr(10).join('#SBATCH ' + s for s in sbatch)}
set -uo pipefail
echo "[hs3] job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $(hostname), $(date -u +%FT%TZ): {cfg.stage}"
cd {shlex.quote(str(REPO_ROOT))}

# Distributed environment: the first node is the rendezvous for every launcher.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-1}}
export HS3_RUN_DIR={shlex.quote(str(Path(cfg.run_dir).resolve()))}
{'export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron TP/SP overlap on Hopper' if cfg.engine == 'megatron' else ''}
{'# container: ' + image if image else '# no container: each task runs the setup lines, then the stage'}
# The gated base model: HF_TOKEN reaches every task through the environment (sbatch and srun export it;
# pyxis passes it into the container). The container does not mount $HOME (--no-container-mount-home):
# without HF_TOKEN, the login's token file is read here, on the host, into the environment, never into a file.
HF_TOKEN_FILE="${{HF_TOKEN_PATH:-${{HF_HOME:-$HOME/.cache/huggingface}}/token}}"
if [ -z "${{HF_TOKEN:-}}" ] && [ -r "$HF_TOKEN_FILE" ]; then export HF_TOKEN="$(cat "$HF_TOKEN_FILE")"; fi
[ -n "${{HF_TOKEN:-}}" ] || echo "[hs3] note: HF_TOKEN is not set (a gated model such as Llama-3.3-70B cannot be downloaded; see ./launch.sh doctor)"
{wandb_key_lines(cfg)}
# Preemption / time limit: USR1 arrives {c.signal_seconds}s before the end; the stage checkpoints,
# exits {code}, and this script requeues the job (it resumes from the latest checkpoint).
OUT={shlex.quote(str(out))}
mkdir -p "$OUT"
rm -f "$OUT/{preemption.PREEMPT_REQUEST_FILE}" "$OUT/{preemption.PREEMPTED_MARKER_FILE}"
got_usr1=0
on_usr1() {{
  got_usr1=1
  {request}
}}
trap on_usr1 USR1

{launch_block(cfg, files['config'], command)}
STAGE_PID=$!
# A trapped signal interrupts `wait`: wait again until the stage itself has ended.
while :; do
  got_usr1=0
  rc=0; wait "$STAGE_PID" || rc=$?
  [ "$got_usr1" = 1 ] || break
done
if [ "$rc" = {code} ] || [ -f "$OUT/{preemption.PREEMPTED_MARKER_FILE}" ]; then
  echo "[hs3] checkpoint saved (exit $rc): requeueing job $SLURM_JOB_ID to resume"
  rm -f "$OUT/{preemption.PREEMPTED_MARKER_FILE}"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[hs3] {cfg.stage} exited with $rc at $(date -u +%FT%TZ)"
exit "$rc"
"""


# ---- submitting -------------------------------------------------------------------------------

def write_job(cfg) -> dict[str, Path]:
    """Write STAGE.yaml and STAGE.sbatch under RUN_DIR/slurm/."""
    files = job_files(cfg)
    atomic_write_text(files["config"], to_yaml(job_config(cfg)))
    atomic_write_text(files["script"], render_script(cfg))
    return files


def sbatch(script: Path, after: list[str] = ()) -> str:
    """Submit; returns the job id. `after`: job ids that must finish OK first."""
    command = ["sbatch", "--parsable"]
    if after:
        command.append("--dependency=afterok:" + ":".join(after))
    command.append(str(script))
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise UserError("sbatch not found: executor=slurm needs a SLURM login node (or use executor=local)") from None
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise UserError(f"sbatch {script.name} failed: {message[-1] if message else f'exit {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0]


def record_jobs(run_dir: str, entries: dict[str, dict]) -> Path:
    """Merge stage -> job entries into RUN_DIR/jobs.json."""
    path = Path(run_dir).resolve() / "jobs.json"
    jobs = json.loads(path.read_text()) if path.is_file() else {}
    jobs.update(entries)
    atomic_write_json(path, jobs)
    return path


def _entry(cfg, files: dict[str, Path], job_id: str, after: list[str]) -> dict:
    return {"job_id": job_id, "after": after, "script": str(files["script"]),
            "log": str(files["log"]).replace("%j", job_id), "out": str(Path(cfg.out).resolve()),
            "submitted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def check_not_running(cfg) -> None:
    """One job per output dir: refuse while this stage's earlier job is queued or running, or while
    another job or process holds the output dir's lock."""
    jobs_file = Path(cfg.run_dir).resolve() / "jobs.json"
    entry = (json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}).get(entry_name(cfg))
    if entry:
        state = scontrol_job(entry["job_id"]).get("JobState")
        if state in preemption.LIVE_JOB_STATES:
            raise UserError(f"{entry_name(cfg)} of {cfg.run_dir} is already {state} as job {entry['job_id']} "
                            f"(wait for it, or scancel {entry['job_id']})")
    holder = preemption.OutputLock(cfg.out).holder()
    if holder:
        raise UserError(f"{cfg.out} is being written by {holder} (lock {Path(cfg.out) / preemption.LOCK_FILE})")


def submit_stage(cfg) -> dict:
    """Render (and unless cfg.dry_run, submit) one stage's job."""
    if cfg.dry_run:
        job_config(cfg)  # a config the job could not run is an error now, not after the queue wait
        print(render_script(cfg), end="")
        return {"stage": cfg.stage, "metric": "dry-run", "value": None, "out": str(cfg.out)}
    check_not_running(cfg)
    files = write_job(cfg)
    job_id = sbatch(files["script"])
    record_jobs(cfg.run_dir, {entry_name(cfg): _entry(cfg, files, job_id, [])})
    print(f"submitted {entry_name(cfg)} as job {job_id}: log {str(files['log']).replace('%j', job_id)}; "
          f"./launch.sh status {cfg.run_dir}")
    return {"stage": cfg.stage, "metric": "job", "value": int(job_id) if job_id.isdigit() else None, "out": str(cfg.out)}


def submit_pipeline(cfgs: dict, needs: dict[str, list[str]], dry_run: bool = False) -> dict[str, str]:
    """Submit every entry given (name -> config, in order) as its own job, each waiting (afterok) for the
    given entries it needs (the preset's graph, launcher/stages.py); --kill-on-invalid-dep=yes cancels the
    dependents of a stage that fails. Which entries to submit is the pipeline's decision (launcher.pipeline
    decide: finished ones are skipped unless an entry they need runs again), not made again here."""
    run_dirs = {str(Path(c.run_dir).resolve()) for c in cfgs.values()}
    if len(run_dirs) != 1:
        raise ConfigError(f"every pipeline stage needs the same run_dir, got {sorted(run_dirs)}")
    job_ids: dict[str, str] = {}
    entries: dict[str, dict] = {}
    for stage, cfg in cfgs.items():
        after = [job_ids[s] for s in needs.get(stage, []) if s in job_ids]
        if dry_run:
            job_ids[stage] = f"${stage.upper()}_JOB"
            dependency = f" --dependency=afterok:{':'.join(after)}" if after else ""
            job_config(cfg)
            print(f"# ---- {stage}: sbatch --parsable{dependency} {job_files(cfg)['script']}")
            print(render_script(cfg))
            continue
        check_not_running(cfg)
        files = write_job(cfg)
        job_ids[stage] = sbatch(files["script"], after)
        entries[stage] = _entry(cfg, files, job_ids[stage], after)
        record_jobs(cfg.run_dir, entries)
        print(f"{stage}: job {job_ids[stage]}" + (f" (after {', '.join(after)})" if after else ""))
    if not dry_run:
        run_dir = next(iter(cfgs.values())).run_dir
        print(f"submitted {len(job_ids)} jobs ({' -> '.join(job_ids.values())}); recorded in "
              f"{Path(run_dir) / 'jobs.json'}; follow with ./launch.sh status {run_dir}")
    return job_ids


# ---- asking SLURM about a job (`./launch.sh status` is launcher/status.py) ------------------------

def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o ID` as a dict ({} once SLURM has forgotten the job: MinJobAge)."""
    try:
        proc = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))
