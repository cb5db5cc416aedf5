"""`./launch.sh push OUT/final ORG/NAME` (issue 19 item 3): the model card it writes into final/, the
dry run, and the upload through huggingface_hub's own client (create_repo + upload_folder) against an
HTTP server on localhost that speaks the hub's commit API (HF_ENDPOINT points the client at it).

The server is a stand-in for the Hugging Face hub, which is not reachable here: it records what the
client sends (the repo creation with its visibility, the preupload query, the commit's NDJSON with each
file) and answers "regular" upload mode for every file, so file contents travel inside the commit; the
LFS/Xet transfer of large files is huggingface_hub's and is not exercised."""
from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from launcher.push import CARD_MARKER, CITATION

from .conftest import run_cli

TOKEN = "hf_localtest_not_a_real_token"


class Hub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.requests: list[tuple[str, str, dict]] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.validated: list[str] = []  # README.md contents the client asked the hub to validate

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.server.requests.append(("GET", self.path, {}))
        self._reply(404, {"error": "not served by the test hub"})

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub: Hub = self.server
        auth = self.headers.get("Authorization")
        hub.requests.append(("POST", self.path, {"auth": auth}))
        if auth != f"Bearer {TOKEN}":
            return self._reply(401, {"error": "Invalid credentials"})
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:2] == ["api", "validate-yaml"]:
            hub.validated.append(json.loads(body)["content"])
            return self._reply(200, {"errors": [], "warnings": []})
        if parts[:3] == ["api", "repos", "create"]:
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}"
            hub.repos[repo] = payload
            return self._reply(200, {"url": f"{hub.url}/{repo}"})
        if parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            assert lines[0]["key"] == "header"
            stored = hub.files.setdefault(repo, {})
            for line in lines[1:]:
                assert line["key"] == "file", line  # every file was announced as "regular"
                stored[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd" * 5})
        return self._reply(404, {"error": f"not served by the test hub: {self.path}"})


@pytest.fixture
def hub():
    server = Hub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def stage_dir(tmp_path, tiny_model_dir) -> Path:
    """A finished rl stage in the files the stages write: final/ (the tiny model, its training record),
    config.yaml, TRL's card beside final/, and the run's eval report of this final/."""
    from recipes.config import compose, to_yaml

    run = tmp_path / "run"
    out = run / "rl"
    shutil.copytree(tiny_model_dir, out / "final")
    (out / "final" / "training_args.bin").write_bytes(b"pickled trainer args")
    cfg = compose("rl", [f"run_dir={run}", "cluster.setup=[export SECRET=do-not-publish]"])
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "README.md").write_text("This model is a fine-tuned version of [None](https://huggingface.co/None).\n")
    record = {"stage": "rl", "trained_on": ["edit/train", "edit_quality/train"], "data_manifest_sha256": "ab" * 32,
              "init": f"{run}/sft/final"}
    (out / "final" / "hs3_training.json").write_text(json.dumps(record))
    (run / "eval").mkdir(parents=True)
    report = {"meta": {"model": str(out / "final"), "split": "validation", "gold": {"reward_model": "gold-rm"},
                       "notes": ["a note of the eval"]},
              "counts": {"rows": 49, "pairs": 98},
              "overall": {"gold_reward_win_rate": {"value": 0.6123, "ci": [0.48, 0.74], "n": 49},
                          "copy_rate": {"value": 0.1, "ci": [0.04, 0.2], "n": 49},
                          "chrf": {"value": 0.55, "ci": [0.5, 0.6], "n": 49}}}
    (run / "eval" / "report.json").write_text(json.dumps(report))
    return out


def push(*args, env=None):
    return run_cli("-m", "launcher", "push", *map(str, args), env=env, timeout=300)


def test_dry_run_shows_the_card_and_writes_nothing(stage_dir):
    before = sorted(p.name for p in (stage_dir / "final").iterdir())
    proc = push(stage_dir / "final", "me/hs3-edit", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = proc.stdout
    assert sorted(p.name for p in (stage_dir / "final").iterdir()) == before  # no README.md written
    assert CARD_MARKER in card and CITATION in card and "fine-tuned version of [None]" not in card
    assert "| base model | `builtin:tiny` |" in card
    assert f"| data manifest sha256 | `{'ab' * 32}` |" in card
    assert "| `gold_reward_win_rate` | edit beats the original (gold reward model) | 0.612 | [0.480, 0.740] | 49 |" in card
    assert "| `copy_rate` | edits that copy the original unchanged | 0.100 | [0.040, 0.200] | 49 |" in card
    assert "49 rows, 98 pairs" in card and "- a note of the eval" in card
    assert '"trained_on": [' in card and "kl_coef: 0.05" in card  # training record and resolved config
    assert "do-not-publish" not in card  # the cluster section stays home
    assert "HfApi().create_repo('me/hs3-edit', repo_type='model', private=True, exist_ok=True)" in card
    assert "ignore_patterns=['training_args.bin', '.*', '**/.*']" in card


def test_a_report_of_another_model_is_not_on_the_card(stage_dir, tmp_path):
    other = tmp_path / "other_eval"
    other.mkdir()
    report = json.loads((stage_dir.parent / "eval" / "report.json").read_text())
    report["meta"]["model"] = str(tmp_path / "someone_else" / "final")
    (other / "report.json").write_text(json.dumps(report))
    proc = push(stage_dir / "final", "me/x", "--dry-run", "--eval", other)
    assert proc.returncode == 2 and "that report scored" in proc.stderr and proc.stderr.count("\n") == 1
    (stage_dir.parent / "eval" / "report.json").write_text(json.dumps(report))  # the run's own eval is of another model
    proc = push(stage_dir / "final", "me/x", "--dry-run")
    assert proc.returncode == 0 and "No eval report of this checkpoint was found" in proc.stdout
    assert "0.612" not in proc.stdout


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "final" / "hs3_training.json").unlink(), "hs3_training.json: no such file"),
    (lambda d: (d / "config.yaml").write_text("- not a mapping"), "no readable resolved config"),
    (lambda d: (d / "final" / "README.md").write_text("my own card"), "was not written by push (kept)"),
])
def test_what_push_refuses(stage_dir, setup, message):
    setup(stage_dir)
    proc = push(stage_dir / "final", "me/x", "--dry-run")
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    if message.startswith("was not written"):
        assert (stage_dir / "final" / "README.md").read_text() == "my own card"


def test_upload_through_huggingface_hub_to_a_local_hub(stage_dir, hub):
    env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = push(stage_dir / "final", "me/hs3-edit", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"pushed {stage_dir / 'final'} to {hub.url}/me/hs3-edit (private), commit" in proc.stdout
    assert hub.repos["me/hs3-edit"]["visibility"] == "private"
    uploaded = hub.files["me/hs3-edit"]
    local = {str(p.relative_to(stage_dir / "final")): p.read_bytes() for p in (stage_dir / "final").rglob("*") if p.is_file()}
    assert set(uploaded) == set(local) - {"training_args.bin"} and "README.md" in uploaded
    assert all(uploaded[name] == local[name] for name in uploaded)  # byte for byte
    card = uploaded["README.md"].decode()
    assert card == (stage_dir / "final" / "README.md").read_text() and CARD_MARKER in card
    assert "fine-tuned version of [None]" not in card  # TRL's card (beside final/) is not the card
    assert hub.validated == [card]  # huggingface_hub has the hub check the card's metadata first
    assert all(auth == f"Bearer {TOKEN}" for _, _, info in hub.requests if (auth := info.get("auth")) is not None)

    again = push(stage_dir / "final", "me/hs3-edit", "--public", env=env)  # our own card is rewritten, not refused
    assert again.returncode == 0, again.stderr[-2000:]
    assert hub.repos["me/hs3-edit"]["visibility"] == "public"


def test_a_refused_login_is_one_line(stage_dir, hub):
    proc = push(stage_dir / "final", "me/x", env={"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_wrong", "HF_HUB_OFFLINE": "0"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "push to me/x" in proc.stderr, proc.stderr
