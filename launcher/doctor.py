"""`./launch.sh doctor cluster=NAME [key=value ...]`: before anyone waits hours in a queue, check on the
SLURM login node what a run of the configured model (default: the paper's 70B on engine=megatron) needs.

One line per check: PASS / FAIL / SKIP, what was found, and for a failure what to do. Exit 1 if any
check fails, 0 otherwise.

  commands    sbatch, srun, scontrol, sinfo on PATH
  account     cluster.account is one of the user's SLURM associations (sacctmgr)
  partition   cluster.partition exists and is UP, with enough nodes for the plan (scontrol show partition)
  gpus        the partition's nodes have cluster.gpus_per_node GPUs (scontrol show node: Gres=gpu:...)
  container   pyxis is in srun when the chain runs in containers
  images      every image the chain uses (the Megatron-Bridge, NeMo-RL and data/eval images of the pipeline
              preset: `container_image` of each entry) can be had: a squashfs file is readable; a registry
              image's manifest answers the registry's HTTP API (Docker Registry v2: HEAD
              /v2/REPO/manifests/TAG, with the bearer-token exchange and enroot's credentials for that
              registry, $ENROOT_CONFIG_PATH/.credentials), which is what enroot asks before it pulls
  image-deps  a one-task job in the image of the stages that run our code (data, eval) runs
              `python -m launcher.image_probe`: our packages import and pyproject.toml's requirements are met
              (its lower bounds are the versions the tests ran with)
  shared-fs   a one-minute job on a compute node writes a file under run_dir; the login node reads it
  hf-token    HF_TOKEN (or the login's token file) is set
  hf-model    the base model is reachable with it: an HTTP HEAD to $HF_ENDPOINT (default
              https://huggingface.co) for MODEL/resolve/main/config.json, 10 s timeout
  disk        run_dir's file system has room for one checkpoint with optimizer state
              (bf16 weights + fp32 master weights and Adam m, v: 14 bytes/parameter, ~1 TB for 70B)
"""
from __future__ import annotations

import base64
import getpass
import json
import netrc
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
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


def chain_images(cfgs: dict) -> dict[str, list[str]]:
    """image -> the chain's entries that run in it (launcher.slurm.container_image of each)."""
    from launcher.slurm import container_image

    images: dict[str, list[str]] = {}
    for name, entry_cfg in cfgs.items():
        image = container_image(entry_cfg)
        if image:
            images.setdefault(image, []).append(name)
    return images


def check_container(cfg, images: dict[str, list[str]]) -> tuple[str, str]:
    if not images:
        return SKIP, "no container configured: tasks run the cluster's setup lines on the host"
    help_text = _run(["srun", "--help"]).stdout
    if "--container-image" not in help_text:
        return FAIL, (f"srun has no --container-image (pyxis is not installed) but the chain runs in {len(images)} "
                      "image(s) -> ask the admins for pyxis/enroot, or set the container keys to null")
    return PASS, f"pyxis present (srun --container-image) for {len(images)} image(s)"


def parse_image(image: str) -> tuple[str, str, str]:
    """(registry, repository, tag or digest) of a docker-style `[REGISTRY/]REPO[:TAG|@DIGEST]` or an enroot-style
    `REGISTRY#REPO[:TAG]` reference; Docker Hub for a reference without a registry."""
    if "#" in image:
        registry, rest = image.split("#", 1)
    else:
        first, _, remainder = image.partition("/")
        if remainder and ("." in first or ":" in first or first == "localhost"):
            registry, rest = first, remainder
        else:
            registry, rest = "registry-1.docker.io", image
    if registry in ("docker.io", "index.docker.io"):
        registry = "registry-1.docker.io"
    if registry == "registry-1.docker.io" and "/" not in rest.split("@")[0].split(":")[0]:
        rest = "library/" + rest
    if "@" in rest:
        repository, reference = rest.split("@", 1)
    else:
        head, _, tag = rest.rpartition(":")
        repository, reference = (head, tag) if head and "/" not in tag else (rest, "latest")
    return registry, repository, reference


def enroot_credentials(registry: str) -> tuple[str, str] | None:
    """(login, password) for the registry from enroot's credentials file (netrc format; a password written as
    $VARIABLE is read from the environment, as enroot does), or None."""
    path = Path(os.environ.get("ENROOT_CONFIG_PATH", Path.home() / ".config" / "enroot")) / ".credentials"
    if not path.is_file():
        return None
    try:
        entry = netrc.netrc(str(path)).authenticators(registry.split(":")[0]) or netrc.netrc(str(path)).authenticators(registry)
    except (netrc.NetrcParseError, OSError):
        return None
    if not entry:
        return None
    login, _, password = entry
    if password and password.startswith("$"):
        password = os.environ.get(password[1:], "")
    return login or "", password or ""


MANIFEST_TYPES = ", ".join(("application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
                            "application/vnd.docker.distribution.manifest.list.v2+json",
                            "application/vnd.docker.distribution.manifest.v2+json"))


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, params = header.partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params))


def manifest_status(image: str, timeout: float = 15.0) -> tuple[int | None, str]:
    """HTTP status of the image's manifest (None: unreachable, with the reason), after the registry's auth
    exchange (Docker Registry HTTP API v2; token auth as nvcr.io and Docker Hub use it)."""
    registry, repository, reference = parse_image(image)
    scheme = "http" if registry.split(":")[0] in ("localhost", "127.0.0.1") else "https"
    url = f"{scheme}://{registry}/v2/{repository}/manifests/{reference}"
    credentials = enroot_credentials(registry)

    def head(authorization: str | None):
        request = urllib.request.Request(url, method="HEAD", headers={"Accept": MANIFEST_TYPES})
        if authorization:
            request.add_header("Authorization", authorization)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.headers
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers

    try:
        status, headers = head(None)
        if status == 401 and headers.get("WWW-Authenticate"):
            scheme_name, params = _challenge(headers["WWW-Authenticate"])
            basic = None
            if credentials:
                basic = "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
            if scheme_name == "bearer" and params.get("realm"):
                query = urllib.parse.urlencode({k: v for k, v in params.items() if k in ("service", "scope")})
                token_request = urllib.request.Request(f"{params['realm']}?{query}")
                if basic:
                    token_request.add_header("Authorization", basic)
                try:
                    with urllib.request.urlopen(token_request, timeout=timeout) as response:
                        reply = json.loads(response.read() or b"{}")
                except urllib.error.HTTPError as exc:
                    return exc.code, f"the token service {params['realm']} refused {'the credentials' if basic else 'an anonymous request'}"
                token = (reply.get("token") or reply.get("access_token")) if isinstance(reply, dict) else None
                status, headers = head(f"Bearer {token}") if token else (401, headers)
            elif scheme_name == "basic" and basic:
                status, headers = head(basic)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return None, str(getattr(exc, "reason", exc))
    return status, ""


def check_images(cfg, images: dict[str, list[str]]) -> tuple[str, str]:
    if not images:
        return SKIP, "no container configured"
    found, problems = [], []
    for image, entries in images.items():
        used_by = f"({', '.join(entries)})"
        if image.startswith("/") or image.endswith(".sqsh"):
            if os.access(image, os.R_OK):
                found.append(f"{image} readable {used_by}")
            else:
                problems.append(f"{image} {used_by} is not readable here -> build it onto the shared file system "
                                f"(docker/build_megatron_bridge.sh, docker/build_hs3.sh: docs/megatron.md)")
            continue
        registry = parse_image(image)[0]
        status, reason = manifest_status(image)
        if status is None:
            problems.append(f"{image} {used_by}: registry {registry} unreachable ({reason}) -> the nodes pull it from there")
        elif status in (401, 403):
            creds = Path(os.environ.get("ENROOT_CONFIG_PATH", Path.home() / ".config" / "enroot")) / ".credentials"
            what = "refused the credentials" if enroot_credentials(registry) else "needs credentials"
            problems.append(f"{image} {used_by}: {registry} {what} (HTTP {status}{': ' + reason if reason else ''}) -> add "
                            f"`machine {registry.split(':')[0]} login LOGIN password TOKEN` to {creds} (nvcr.io: login "
                            f"$oauthtoken, password an NGC API key)")
        elif status == 404:
            problems.append(f"{image} {used_by}: no such image or tag on {registry} (HTTP 404)")
        elif status >= 400:
            problems.append(f"{image} {used_by}: HTTP {status} from {registry}")
        else:
            found.append(f"{image} can be pulled {used_by}")
    if problems:
        return FAIL, "; ".join(problems + found)
    return PASS, "; ".join(found)


def _submit_and_wait(cfg, name: str, log: Path, wrap: str, minutes: int = 5) -> tuple[str, str]:
    """(job id, final state) of a one-task job of at most `minutes`, or raises _JobProblem with the FAIL detail."""
    command = ["sbatch", "--parsable", f"--job-name=hs3-doctor-{name}", f"--time={minutes}", "--nodes=1", "--ntasks=1",
               f"--output={log}"]
    for key in ("account", "partition", "qos"):
        if cfg.cluster[key]:
            command.append(f"--{key}={cfg.cluster[key]}")
    proc = _run([*command, "--wrap=" + wrap])
    if proc.returncode != 0:
        raise _JobProblem(f"the {minutes}-minute test job was refused: {_err(proc)} -> fix the partition/account first")
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + FS_JOB_TIMEOUT_S
    state = "?"
    while time.monotonic() < deadline:
        info = dict(re.findall(r"(\w+)=(\S*)", _run(["scontrol", "show", "job", "-o", job]).stdout))
        state = info.get("JobState", "GONE")
        if state not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return job, state
        time.sleep(1)
    _run(["scancel", job])
    raise _JobProblem(f"test job {job} still {state} after {FS_JOB_TIMEOUT_S} s (cancelled) -> the queue is busy: "
                      f"rerun later, or HS3_DOCTOR_JOB_TIMEOUT=SECONDS")


class _JobProblem(Exception):
    pass


def check_image_deps(cfg, data_cfg) -> tuple[str, str]:
    """The image data and eval run in imports our packages at pyproject.toml's versions (a job runs the probe)."""
    from launcher.image_probe import requirement_name
    from launcher.slurm import container_image, in_task, srun_prefix

    image = container_image(data_cfg)
    where = image or "the nodes' own environment (cluster.setup lines; no container)"
    if image and "--container-image" not in _run(["srun", "--help"]).stdout:
        return SKIP, f"{image}: needs pyxis to start (see container)"
    probe_dir = Path(cfg.run_dir).resolve() / ".doctor"
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return FAIL, f"cannot create {probe_dir}: {exc.strerror} -> pick a writable run_dir"
    log = probe_dir / f"image-deps-{uuid.uuid4().hex}.log"
    wrap = f"{srun_prefix(data_cfg, '--nodes=1', '--ntasks=1')} {in_task(data_cfg, 'exec python -m launcher.image_probe')}"
    try:
        job, state = _submit_and_wait(cfg, "deps", log, wrap)
    except _JobProblem as exc:
        return FAIL, str(exc)
    text = log.read_text(errors="replace") if log.is_file() else ""
    log.unlink(missing_ok=True)
    line = next((ln for ln in text.splitlines() if ln.startswith("HS3_IMAGE_PROBE ")), None)
    if line is None:
        last = (text.strip().splitlines() or [f"job {job} {state}"])[-1]
        return FAIL, f"{where}: `python -m launcher.image_probe` did not run ({last[-200:]}) -> an image with Python 3.11+ and our dependencies (docker/build_hs3.sh)"
    try:
        report = json.loads(line.split(" ", 1)[1])
        bad = [f"{req} (found {info['found'] or 'none'})" for req, info in report["requirements"].items() if not info["ok"]]
        broken = [f"{pkg}: {error}" for pkg, error in report["imports"].items() if error]
        python, requirements = report["python"], len(report["requirements"])
        untested = [f"{requirement_name(req)} {info['found']} (tested {info['tested']})"
                    for req, info in report["requirements"].items()
                    if info["ok"] and info.get("tested") and info["found"] != info["tested"]]
    except (IndexError, ValueError, KeyError, TypeError, AttributeError):
        return FAIL, (f"{where}: `python -m launcher.image_probe` printed a report this doctor cannot read "
                      f"({line[:120]!r}) -> the image's copy of this repository is not this checkout's version")
    if bad or broken:
        return FAIL, (f"{where} (python {python}): " + "; ".join(
            ([f"requirements not met: {', '.join(bad)}"] if bad else []) + ([f"imports fail: {', '.join(broken)}"] if broken else []))
            + " -> build the image with docker/build_hs3.sh (pyproject.toml's dependencies) and set cluster.container_image")
    return PASS, (f"{where} (python {python}): our packages import; {requirements} requirements "
                  f"of pyproject.toml met" + (f"; not at the tested versions (constraints.txt; docker/build_hs3.sh "
                                              f"installs those): {', '.join(untested)}" if untested else ""))


def check_shared_fs(cfg) -> tuple[str, str]:
    run_dir = Path(cfg.run_dir).resolve()
    probe_dir = run_dir / ".doctor"
    try:
        probe_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return FAIL, f"cannot create {probe_dir} on the login node: {exc.strerror} -> pick a writable run_dir"
    target = probe_dir / f"written-by-job-{uuid.uuid4().hex}"
    try:
        job, state = _submit_and_wait(cfg, "fs", probe_dir / f"fs-{target.name}.log", "hostname > " + _sh(str(target)),
                                      minutes=1)
    except _JobProblem as exc:
        return FAIL, str(exc)
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


CHECK_NAMES = ["commands", "account", "partition", "gpus", "container", "images", "image-deps", "shared-fs",
               "hf-token", "hf-model", "disk"]
NEEDS_SLURM = {"account", "partition", "gpus", "container", "image-deps", "shared-fs"}


def chain_cfgs(args: list[str]) -> dict:
    """The pipeline the doctor's arguments would submit (launcher.pipeline: engine=megatron -> the megatron
    preset), entry name -> config."""
    from launcher.pipeline import stage_args

    chain, entry_args, _ = stage_args("default", args)
    return {name: compose(entry.stage, entry_args[name]) for name, entry in chain.items()}


def main(argv: list[str]) -> int:
    """./launch.sh doctor cluster=NAME [key=value ...]: one line per check; exit 1 if any fails."""
    if not any(a.startswith("cluster=") for a in argv):
        raise UserError("usage: ./launch.sh doctor cluster=NAME [key=value ...] (checks for a run on that cluster)")
    defaults = [d for d, key in (("engine=megatron", "engine="), ("model=llama33_70b", "model="))
                if not any(a.startswith(key) for a in argv)]
    args = [*defaults, *argv, "executor=slurm"]
    cfg = compose("sft", args)
    print(f"doctor: {cfg.model.name} on engine={cfg.engine}, cluster={cfg.cluster.name}, run_dir={cfg.run_dir}", flush=True)
    cfgs = chain_cfgs(args)
    images = chain_images(cfgs)
    data_cfg = cfgs.get("data") or compose("data", args)
    checks = {"commands": check_commands, "account": check_account, "partition": check_partition, "gpus": check_gpus,
              "container": lambda c: check_container(c, images), "images": lambda c: check_images(c, images),
              "image-deps": lambda c: check_image_deps(c, data_cfg), "shared-fs": check_shared_fs,
              "hf-token": check_hf_token, "hf-model": check_hf_model, "disk": check_disk}
    failed = 0
    have_slurm = True
    for name in CHECK_NAMES:
        check = checks[name]
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
