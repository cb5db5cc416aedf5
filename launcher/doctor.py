"""`./launch.sh doctor cluster=NAME [key=value ...]`: before anyone waits hours in a queue, check on the
SLURM login node what a run of the configured model (default: the paper's 70B on engine=megatron) needs.

One line per check: PASS / FAIL / SKIP, what was found, and for a failure what to do. Exit 1 if any
check fails, 0 otherwise.

  commands    sbatch, srun, scontrol, sinfo on PATH
  account     cluster.account is one of the user's SLURM associations (sacctmgr)
  partition   cluster.partition exists and is UP, with enough nodes for the plan (scontrol show partition)
  gpus        the partition's nodes have cluster.gpus_per_node GPUs (scontrol show node: Gres=gpu:...)
  container   pyxis is in srun and enroot has credentials for the image's registry (nvcr.io needs them)
  shared-fs   a one-minute job on a compute node writes a file under run_dir; the login node reads it
  hf-token    HF_TOKEN (or the login's token file) is set
  hf-model    the base model is reachable with it: an HTTP HEAD to $HF_ENDPOINT (default
              https://huggingface.co) for MODEL/resolve/main/config.json, 10 s timeout
  disk        run_dir's file system has room for one checkpoint with optimizer state
              (bf16 weights + fp32 master weights and Adam m, v: 14 bytes/parameter, ~1 TB for 70B)
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from recipes.config import compose
from hs3.io import UserError

CHECKPOINT_BYTES_PER_PARAM = 2 + 12  # bf16 weights; fp32 master + Adam m, v (recipes/megatron/plan.py memory_per_gpu)
HF_ENDPOINT = "https://huggingface.co"
FS_JOB_TIMEOUT_S = int(os.environ.get("HS3_DOCTOR_JOB_TIMEOUT", "300"))
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


def _run(cmd: list[str], timeout: int = 30) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: command not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{' '.join(cmd[:3])}: no answer in {timeout} s")


def _err(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    return lines[-1] if lines else f"exit {proc.returncode}"


def check_commands(cfg) -> tuple[str, str]:
    missing = [c for c in ("sbatch", "srun", "scontrol", "sinfo") if not shutil.which(c)]
    if missing:
        return FAIL, f"not on PATH: {', '.join(missing)} -> run the doctor on the cluster's login node (or load its slurm module)"
    return PASS, "sbatch, srun, scontrol, sinfo found"


def check_account(cfg) -> tuple[str, str]:
    account = cfg.cluster.account
    if not account:
        return SKIP, "no cluster.account configured: jobs use your default account"
    proc = _run(["sacctmgr", "-nP", "show", "assoc", f"user={getpass.getuser()}", "format=account"])
    if proc.returncode != 0:
        return SKIP, f"cannot ask the accounting database ({_err(proc)}); check with: sacctmgr show assoc user=$USER"
    accounts = sorted({a.strip() for a in proc.stdout.split() if a.strip()})
    if account not in accounts:
        return FAIL, (f"account {account} is not one of yours ({', '.join(accounts) or 'none'}) -> set "
                      f"cluster.account in conf/cluster/{cfg.cluster.name}.yaml")
    return PASS, f"account {account} is yours"


def _partition(cfg) -> tuple[str | None, dict, str]:
    name = cfg.cluster.partition
    if not name:
        proc = _run(["sinfo", "-h", "-o", "%P"])
        default = [p[:-1] for p in proc.stdout.split() if p.endswith("*")]
        if not default:
            return None, {}, f"no cluster.partition and no default partition ({_err(proc)})"
        name = default[0]
    proc = _run(["scontrol", "show", "partition", name, "-o"])
    if proc.returncode != 0 or "PartitionName=" not in proc.stdout:
        listed = _run(["sinfo", "-h", "-o", "%R"]).stdout.split()
        return name, {}, f"partition {name} does not exist (partitions: {', '.join(sorted(set(listed))) or '?'})"
    return name, dict(re.findall(r"(\w+)=(\S*)", proc.stdout)), ""


def _nodes_needed(cfg) -> tuple[int, int]:
    from launcher.slurm import job_shape

    return job_shape(cfg)


def check_partition(cfg) -> tuple[str, str]:
    name, info, error = _partition(cfg)
    if error:
        return FAIL, f"{error} -> set cluster.partition in conf/cluster/{cfg.cluster.name}.yaml"
    nodes, _ = _nodes_needed(cfg)
    total = int(info.get("TotalNodes", "0") or 0)
    if info.get("State") != "UP":
        return FAIL, f"partition {name} is {info.get('State')} -> pick a partition that is UP (sinfo)"
    if total < nodes:
        return FAIL, f"partition {name} has {total} nodes, the {cfg.stage} plan needs {nodes} -> a bigger partition or fewer nodes"
    return PASS, f"partition {name} is UP with {total} nodes (the {cfg.stage} plan needs {nodes})"


def _node_gpus(gres: str) -> int:
    """GPUs in a Gres string: gpu:8, gpu:h100:8, gpu:h100:8(S:0-1), several entries comma-separated."""
    total = 0
    for entry in gres.split(","):
        m = re.match(r"gpu(?::[^:(]+)?:(\d+)", entry)
        if m:
            total += int(m.group(1))
    return total


def check_gpus(cfg) -> tuple[str, str]:
    want = cfg.cluster.gpus_per_node
    if not want:
        return SKIP, "cluster.gpus_per_node is 0: CPU jobs"
    name, info, error = _partition(cfg)
    if error:
        return FAIL, f"cannot read the partition's nodes: {error}"
    proc = _run(["scontrol", "show", "node", info.get("Nodes", ""), "-o"])
    found = {m.group(1): _node_gpus(m.group(2)) for m in re.finditer(r"NodeName=(\S+).*?\bGres=(\S*)", proc.stdout)}
    if not found:
        return FAIL, f"no nodes in partition {name} ({_err(proc)})"
    short = sorted(n for n, g in found.items() if g < want)
    if short:
        return FAIL, (f"{len(short)} of {len(found)} nodes of {name} have fewer than {want} GPUs in their Gres "
                      f"(e.g. {short[0]}: {found[short[0]]}) -> set cluster.gpus_per_node to what the nodes have, or pick "
                      f"a GPU partition")
    return PASS, f"every node of {name} has >= {want} GPUs (Gres)"


def check_container(cfg) -> tuple[str, str]:
    from launcher.slurm import container_image

    image = container_image(cfg)
    if not image:
        return SKIP, "no container configured: tasks run the cluster's setup lines on the host"
    help_text = _run(["srun", "--help"]).stdout
    if "--container-image" not in help_text:
        return FAIL, f"srun has no --container-image (pyxis is not installed) but {image} is configured -> ask the admins for pyxis/enroot, or set the container keys to null"
    if image.startswith("/") or image.endswith(".sqsh"):  # a squashfs file built beforehand (README)
        if not os.access(image, os.R_OK):
            return FAIL, f"{image} is not readable here -> build it (README: the pinned container recipe) onto the shared file system"
        return PASS, f"pyxis present; {image} is readable"
    registry = image.split("/")[0] if "/" in image and "." in image.split("/")[0] else "registry-1.docker.io"
    config_dir = Path(os.environ.get("ENROOT_CONFIG_PATH", Path.home() / ".config" / "enroot"))
    creds = config_dir / ".credentials"
    if registry == "nvcr.io" and not (creds.is_file() and re.search(r"machine\s+nvcr\.io\b", creds.read_text())):
        return FAIL, (f"{image}: no nvcr.io credentials in {creds} -> add `machine nvcr.io login $oauthtoken password "
                      f"NGC_API_KEY` (https://ngc.nvidia.com/setup/api-key)")
    return PASS, f"pyxis present; enroot can authenticate to {registry} for {image} (the first job pulls it)"


def check_shared_fs(cfg) -> tuple[str, str]:
    run_dir = Path(cfg.run_dir).resolve()
    probe_dir = run_dir / ".doctor"
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return FAIL, f"cannot create {probe_dir} on the login node: {exc.strerror} -> pick a writable run_dir"
    token = uuid.uuid4().hex
    target = probe_dir / f"written-by-job-{token}"
    command = ["sbatch", "--parsable", "--job-name=hs3-doctor", "--time=1", "--nodes=1", "--ntasks=1",
               f"--output={probe_dir}/job-%j.log"]
    for key in ("account", "partition", "qos"):
        if cfg.cluster[key]:
            command.append(f"--{key}={cfg.cluster[key]}")
    command.append("--wrap=hostname > " + _sh(str(target)))
    proc = _run(command)
    if proc.returncode != 0:
        return FAIL, f"the one-minute test job was refused: {_err(proc)} -> fix the partition/account first"
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + FS_JOB_TIMEOUT_S
    state = "?"
    while time.monotonic() < deadline:
        info = dict(re.findall(r"(\w+)=(\S*)", _run(["scontrol", "show", "job", "-o", job]).stdout))
        state = info.get("JobState", "GONE")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            break
        time.sleep(1)
    else:
        _run(["scancel", job])
        return FAIL, (f"test job {job} still {state} after {FS_JOB_TIMEOUT_S} s (cancelled) -> the queue is busy: "
                      f"rerun later, or HS3_DOCTOR_JOB_TIMEOUT=SECONDS")
    if not target.is_file():
        return FAIL, (f"test job {job} ended {state} but {target} is not visible here -> run_dir must be on a "
                      f"file system shared by the login and compute nodes")
    node = target.read_text().strip()
    target.unlink()
    return PASS, f"job {job} on {node} wrote under {run_dir}; read back here"


def _sh(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _hf_token() -> str | None:
    token = os.environ.get("HF_TOKEN")
    if token:
        return token
    path = Path(os.environ.get("HF_TOKEN_PATH") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "token")
    return path.read_text().strip() if path.is_file() and path.read_text().strip() else None


def check_hf_token(cfg) -> tuple[str, str]:
    if _hf_token():
        return PASS, "HF_TOKEN is set (passed to the jobs through the environment, never written to a file)"
    return FAIL, ("HF_TOKEN is not set and there is no token file -> export HF_TOKEN=hf_... (a token of an account "
                  "that accepted the base model's license) before submitting")


def model_id(cfg) -> str | None:
    """The hub id of the base model, None when it is local (a directory, builtin:, a .gguf)."""
    path = cfg.megatron.get("hf_model_id") or cfg.model.path
    if not path or path.startswith(("builtin:", "/", ".")) or Path(path).exists() or path.count("/") != 1:
        return None
    return path


def check_hf_model(cfg) -> tuple[str, str]:
    repo = model_id(cfg)
    if not repo:
        return SKIP, f"model {cfg.model.path} is local: no hub download"
    endpoint = os.environ.get("HF_ENDPOINT", HF_ENDPOINT).rstrip("/")
    url = f"{endpoint}/{repo}/resolve/main/config.json"
    request = urllib.request.Request(url, method="HEAD")
    token = _hf_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return FAIL, (f"{endpoint} is unreachable from here ({reason}) -> the jobs download {repo} from the hub: "
                      f"allow outbound HTTPS, or download it to the shared file system and set model.path to that directory")
    if status in (401, 403):
        return FAIL, (f"{repo}: HTTP {status} -> accept the license at {HF_ENDPOINT}/{repo} with the account of "
                      f"HF_TOKEN, or use a token of an account that has")
    if status == 404:
        return FAIL, f"{repo}: HTTP 404 (no such model) -> check model.path / megatron.hf_model_id"
    if status >= 400:
        return FAIL, f"{repo}: HTTP {status} from {endpoint} -> retry later"
    return PASS, f"{repo} reachable on {endpoint} (HTTP {status})"


def checkpoint_bytes(cfg) -> int:
    from recipes.megatron.plan import parameter_counts, plan_from_cfg

    return parameter_counts(plan_from_cfg(cfg))["total"] * CHECKPOINT_BYTES_PER_PARAM


def check_disk(cfg) -> tuple[str, str]:
    path = Path(cfg.run_dir).resolve()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    need = checkpoint_bytes(cfg)
    text = f"{free / 1e12:.2f} TB free on {path}'s file system; one {cfg.model.name} checkpoint with optimizer state is {need / 1e12:.2f} TB"
    if free < need:
        return FAIL, f"{text} -> put run_dir on a larger (shared) file system, e.g. run_dir=/lustre/..."
    return PASS, text


CHECKS = [("commands", check_commands), ("account", check_account), ("partition", check_partition),
          ("gpus", check_gpus), ("container", check_container), ("shared-fs", check_shared_fs),
          ("hf-token", check_hf_token), ("hf-model", check_hf_model), ("disk", check_disk)]
NEEDS_SLURM = {"account", "partition", "gpus", "container", "shared-fs"}


def main(argv: list[str]) -> int:
    """./launch.sh doctor cluster=NAME [key=value ...]: one line per check; exit 1 if any fails."""
    if not any(a.startswith("cluster=") for a in argv):
        raise UserError("usage: ./launch.sh doctor cluster=NAME [key=value ...] (checks for a run on that cluster)")
    defaults = [d for d, key in (("engine=megatron", "engine="), ("model=llama33_70b", "model="))
                if not any(a.startswith(key) for a in argv)]
    cfg = compose("sft", [*defaults, *argv, "executor=slurm"])
    print(f"doctor: {cfg.model.name} on engine={cfg.engine}, cluster={cfg.cluster.name}, run_dir={cfg.run_dir}", flush=True)
    failed = 0
    have_slurm = True
    for name, check in CHECKS:
        if name in NEEDS_SLURM and not have_slurm:
            status, detail = SKIP, "needs the SLURM commands"
        else:
            status, detail = check(cfg)
        if name == "commands" and status == FAIL:
            have_slurm = False
        failed += status == FAIL
        print(f"{status}  {name:<10} {detail}", flush=True)
    print(f"doctor: {failed} check(s) failed" if failed else "doctor: every check passed or was skipped")
    return 1 if failed else 0
