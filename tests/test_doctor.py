"""`./launch.sh doctor cluster=NAME` on the real 2-node test SLURM (tests/slurm_cluster.sh), with the hub
check against a local HTTP server (HF_ENDPOINT, the variable huggingface_hub reads too) and the image check
against a local registry speaking the Docker Registry v2 HTTP API (manifests, bearer-token exchange)."""
from __future__ import annotations

import base64
import http.server
import json
import socket

import pytest

from recipes.config import compose
from launcher.doctor import chain_cfgs, chain_images, check_hf_model, check_images, parse_image
from tests.conftest import run_cli, serve_http

MODEL = "meta-llama/Llama-3.3-70B-Instruct"


@pytest.fixture
def hub():
    """A local stand-in for the hub's HEAD /MODEL/resolve/main/config.json: 200 with the right token, else 401."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path != f"/{MODEL}/resolve/main/config.json":
                self.send_response(404)
            else:
                self.send_response(200 if self.headers.get("Authorization") == "Bearer hf_good" else 401)
            self.end_headers()

        def log_message(self, *args):
            pass

    with serve_http(Handler) as url:
        yield url, seen


def lines(stdout: str) -> dict[str, str]:
    """check name -> 'STATUS detail'"""
    out = {}
    for line in stdout.splitlines():
        status, _, rest = line.partition("  ")
        if status in ("PASS", "FAIL", "SKIP"):
            name, _, detail = rest.strip().partition(" ")
            out[name] = f"{status} {detail.strip()}"
    return out


@pytest.mark.slurm
def test_doctor_passes_on_a_ready_cluster(slurm, hub, tmp_path):
    endpoint, seen = hub
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=test", "model=tiny",
                   f"megatron.hf_model_id={MODEL}", "megatron.container=", "megatron.nemo_rl_container=",
                   f"run_dir={tmp_path / 'run'}",
                   env={"HF_TOKEN": "hf_good", "HF_ENDPOINT": endpoint}, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = lines(proc.stdout)
    assert list(checks) == ["commands", "account", "partition", "gpus", "container", "images", "image-deps", "shared-fs",
                            "hf-token", "hf-model", "disk"]
    assert checks["partition"] == "PASS partition test is UP with 2 nodes (the sft plan needs 1)"
    assert checks["container"].startswith("SKIP no container configured")
    # data/eval run on the nodes with the cluster's setup (this repo's venv): our packages at the tested versions
    assert checks["image-deps"].startswith("PASS the nodes' own environment") and "our packages import" in checks["image-deps"]
    assert "not at the tested versions" not in checks["image-deps"]  # .venv was installed with -c constraints.txt
    assert checks["shared-fs"].startswith("PASS job ") and " on n" in checks["shared-fs"]  # a compute node wrote it
    assert checks["hf-model"] == f"PASS {MODEL} reachable on {endpoint} (HTTP 200)"
    assert seen == [(f"/{MODEL}/resolve/main/config.json", "Bearer hf_good")]
    assert checks["disk"].startswith("PASS ")
    assert not list((tmp_path / "run" / ".doctor").glob("written-by-job-*"))  # cleaned up
    assert "hf_good" not in proc.stdout


@pytest.mark.slurm
def test_doctor_names_each_failure_and_what_to_do(slurm, hub, tmp_path):
    endpoint, _ = hub
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=nope", "cluster.gpus_per_node=8",
                   f"run_dir={tmp_path / 'run'}", env={"HF_TOKEN": "hf_bad", "HF_ENDPOINT": endpoint}, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    checks = lines(proc.stdout)
    assert checks["partition"].startswith("FAIL partition nope does not exist (partitions: test) -> set cluster.partition")
    assert checks["gpus"].startswith("FAIL cannot read the partition's nodes")
    # the Megatron engine's pinned images are configured, and this SLURM has no pyxis
    assert checks["container"].startswith("FAIL srun has no --container-image (pyxis is not installed)")
    assert checks["images"].startswith("FAIL ") and "megatron-bridge-0.6.2-pytorch26.06.sqsh (import, sft, sft_export)" in checks["images"]
    assert checks["shared-fs"].startswith("FAIL the 1-minute test job was refused")
    assert checks["hf-model"].startswith(f"FAIL {MODEL}: HTTP 401 -> accept the license")
    # the paper's 70B (the doctor's default model): ~1 TB per checkpoint, more than this machine's disk
    assert checks["disk"].startswith("FAIL ") and "one llama33_70b checkpoint with optimizer state is 0.99 TB" in checks["disk"]
    assert proc.stdout.strip().splitlines()[-1] == f"doctor: {sum(v.startswith('FAIL') for v in checks.values())} check(s) failed"


@pytest.mark.slurm
def test_doctor_counts_gpus_in_the_nodes_gres(slurm, tmp_path):
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=test", "cluster.gpus_per_node=8",
                   "model=tiny", "gbs=16", "mbs=1", "megatron.container=", f"run_dir={tmp_path}", env={"HF_TOKEN": "x"},
                   timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines(proc.stdout)["gpus"].startswith("FAIL 2 of 2 nodes of test have fewer than 8 GPUs in their Gres (e.g. n1: 0)")


def test_unreachable_hub_is_a_failed_check_with_what_to_do(monkeypatch):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    status, detail = check_hf_model(compose("sft", ["engine=megatron", "model=llama33_70b"]))
    assert status == "FAIL"
    assert detail.startswith(f"http://127.0.0.1:{port} is unreachable from here (")
    assert detail.endswith("allow outbound HTTPS, or download it to the shared file system and set model.path to that directory")


@pytest.mark.slurm
def test_image_deps_names_what_the_data_and_eval_image_lacks(slurm, tmp_path):
    """A python without our dependencies where data and eval run (here: the system python3, put first on PATH
    by the cluster's setup lines): the job's probe names the unmet requirements and the failed imports."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").symlink_to("/usr/bin/python3")
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=test", "model=tiny", "engine=hf",
                   f"run_dir={tmp_path / 'run'}", f"cluster.setup=[export PATH={shim}:$PATH]", env={"HF_TOKEN": "x"},
                   timeout=300)
    checks = lines(proc.stdout)
    assert checks["image-deps"].startswith("FAIL the nodes' own environment (cluster.setup lines; no container) "
                                           "(python 3."), checks["image-deps"]
    assert "omegaconf>=2.3 (found none)" in checks["image-deps"] and "recipes.config: ModuleNotFoundError: No module named 'omegaconf'" in checks["image-deps"]
    assert checks["image-deps"].endswith("-> build the image with docker/build_hs3.sh (pyproject.toml's dependencies) "
                                         "and set cluster.container_image")


# ---- images: a registry on localhost speaking the Docker Registry v2 HTTP API -------------------------------

@pytest.fixture
def registry():
    """HEAD /v2/REPO/manifests/TAG answers 401 with a bearer challenge; GET /token with the right basic
    credentials gives the token; with it, the known image's manifest is 200, an unknown tag 404."""
    token, seen = "tok-3f9", []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            seen.append(("HEAD", self.path, self.headers.get("Authorization"), self.headers.get("Accept")))
            if self.headers.get("Authorization") != f"Bearer {token}":
                self.send_response(401)
                host = self.headers["Host"]
                self.send_header("WWW-Authenticate", f'Bearer realm="http://{host}/token",service="test-registry",'
                                                     f'scope="repository:nvidia/nemo-rl:pull"')
            else:
                self.send_response(200 if self.path == "/v2/nvidia/nemo-rl/manifests/v0.7.0" else 404)
            self.end_headers()

        def do_GET(self):
            seen.append(("GET", self.path, self.headers.get("Authorization"), None))
            good = "Basic " + base64.b64encode(b"$oauthtoken:ngc-key-123").decode()
            if not self.path.startswith("/token?") or self.headers.get("Authorization") != good:
                self.send_response(401)
                self.end_headers()
                return
            body = json.dumps({"token": token}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    with serve_http(Handler) as url:
        yield url.removeprefix("http://"), seen


def test_every_image_of_the_chain_is_checked(registry, tmp_path, monkeypatch):
    """The megatron chain's images: the Megatron-Bridge squashfs (import, sft, exports to sft), NeMo-RL's registry
    image (rm, rl and their exports) and the data/eval image; each is checked where it would be pulled from."""
    host, seen = registry
    sqsh = tmp_path / "images" / "megatron-bridge-0.6.2-pytorch26.06.sqsh"
    sqsh.parent.mkdir()
    sqsh.write_bytes(b"hsqs")
    args = ["engine=megatron", "cluster=example", "executor=slurm", f"run_dir={tmp_path}", f"megatron.container={sqsh}",
            f"megatron.nemo_rl_container={host}/nvidia/nemo-rl:v0.7.0", f"cluster.container_image={host}/nvidia/hs3:0.1.0"]
    images = chain_images(chain_cfgs(args))
    assert images == {str(sqsh): ["import", "sft", "sft_export"],
                      f"{host}/nvidia/nemo-rl:v0.7.0": ["rm", "rm_export", "rl", "rl_export"],
                      f"{host}/nvidia/hs3:0.1.0": ["data", "eval"]}

    enroot = tmp_path / "enroot"
    enroot.mkdir()
    monkeypatch.setenv("ENROOT_CONFIG_PATH", str(enroot))
    status, detail = check_images(None, images)  # no credentials: the token service refuses
    assert status == "FAIL" and (f"{host}/nvidia/nemo-rl:v0.7.0 (rm, rm_export, rl, rl_export): {host} needs credentials "
                                 f"(HTTP 401: the token service http://{host}/token refused an anonymous request)") in detail
    assert f"-> add `machine 127.0.0.1 login LOGIN password TOKEN` to {enroot / '.credentials'}" in detail
    assert f"{sqsh} readable (import, sft, sft_export)" in detail

    (enroot / ".credentials").write_text("machine 127.0.0.1 login $oauthtoken password $MY_NGC_KEY\n")
    monkeypatch.setenv("MY_NGC_KEY", "ngc-key-123")  # enroot reads a $VARIABLE password from the environment
    status, detail = check_images(None, images)
    assert status == "FAIL" and detail.startswith(f"{host}/nvidia/hs3:0.1.0 (data, eval): no such image or tag on {host} (HTTP 404)")
    assert f"{host}/nvidia/nemo-rl:v0.7.0 can be pulled (rm, rm_export, rl, rl_export)" in detail
    heads = [s for s in seen if s[0] == "HEAD" and s[2]]
    assert heads and all("application/vnd.oci.image.index.v1+json" in s[3] for s in heads)

    sqsh.unlink()
    images.pop(f"{host}/nvidia/hs3:0.1.0")
    status, detail = check_images(None, images)
    assert status == "FAIL" and f"{sqsh} (import, sft, sft_export) is not readable here -> build it" in detail
    assert "ngc-key-123" not in detail


def test_image_references_parse_as_enroot_and_docker_name_them():
    assert parse_image("nvcr.io/nvidia/nemo-rl:v0.7.0") == ("nvcr.io", "nvidia/nemo-rl", "v0.7.0")
    assert parse_image("nvcr.io#nvidia/pytorch:26.06-py3") == ("nvcr.io", "nvidia/pytorch", "26.06-py3")
    assert parse_image("ubuntu") == ("registry-1.docker.io", "library/ubuntu", "latest")
    assert parse_image("localhost:5000/team/img@sha256:ab12") == ("localhost:5000", "team/img", "sha256:ab12")


def test_the_registry_is_unreachable_is_a_failed_check():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    status, detail = check_images(None, {f"127.0.0.1:{port}/nvidia/nemo-rl:v0.7.0": ["rm"]})
    assert status == "FAIL" and f"registry 127.0.0.1:{port} unreachable (" in detail


def test_a_token_service_answering_json_that_is_not_an_object_is_a_failed_check(tmp_path, monkeypatch):
    """A token reply of `[]` (a proxy, a misconfigured registry) is a FAIL line, never an AttributeError."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(401)
            self.send_header("WWW-Authenticate", f'Bearer realm="http://{self.headers["Host"]}/token",service="x"')
            self.end_headers()

        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"[]")

        def log_message(self, *args):
            pass

    with serve_http(Handler) as url:
        (tmp_path / ".credentials").write_text("machine 127.0.0.1 login u password p\n")
        monkeypatch.setenv("ENROOT_CONFIG_PATH", str(tmp_path))
        host = url.removeprefix("http://")
        status, detail = check_images(None, {f"{host}/nvidia/nemo-rl:v0.7.0": ["rm"]})
        assert status == "FAIL" and f"{host}/nvidia/nemo-rl:v0.7.0 (rm)" in detail, detail


@pytest.mark.slurm
def test_an_image_probe_report_doctor_cannot_read_is_a_failed_check(slurm, tmp_path):
    """The image runs another version of this repository, whose probe prints a report of another shape."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text("#!/bin/sh\necho 'HS3_IMAGE_PROBE [\"not\", \"a report\"]'\n")
    (shim / "python").chmod(0o755)
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=test", "model=tiny", "engine=hf",
                   f"run_dir={tmp_path / 'run'}", f"cluster.setup=[export PATH={shim}:$PATH]", env={"HF_TOKEN": "x"},
                   timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr
    checks = lines(proc.stdout)
    assert checks["image-deps"].startswith("FAIL the nodes' own environment") and "cannot read" in checks["image-deps"]


@pytest.mark.slurm
def test_image_deps_names_packages_that_are_allowed_but_not_the_tested_versions(slurm, tmp_path):
    """An image whose packages meet pyproject.toml's lower bounds but are not constraints.txt's versions (what
    the test suite passed with): the check passes and names each one."""
    from launcher.image_probe import probe

    report = probe()
    report["requirements"]["rich>=13"]["found"] = "13.9.0"
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "python").write_text(f"#!/bin/sh\necho 'HS3_IMAGE_PROBE {json.dumps(report)}'\n")
    (shim / "python").chmod(0o755)
    proc = run_cli("-m", "launcher", "doctor", "cluster=local", "cluster.partition=test", "model=tiny", "engine=hf",
                   f"run_dir={tmp_path / 'run'}", f"cluster.setup=[export PATH={shim}:$PATH]", env={"HF_TOKEN": "x"},
                   timeout=300)
    tested = report["requirements"]["rich>=13"]["tested"]
    assert lines(proc.stdout)["image-deps"].endswith(
        f"met; not at the tested versions (constraints.txt; docker/build_hs3.sh installs those): rich 13.9.0 (tested {tested})")
