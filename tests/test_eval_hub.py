"""`eval model=ORG/NAME` when the hub is reachable: huggingface_hub itself downloads the model from an HTTP server
on localhost that answers the hub's download API (HF_ENDPOINT points the client at it; the real hub is out of
reach here), and the report names the hub id, the snapshot it was loaded from and that snapshot's content
fingerprint, which is the served model's. Unreachable or offline: tests/test_eval_provenance.py."""
from __future__ import annotations

import hashlib
import http.server
import json
from pathlib import Path

import pytest

from .conftest import run_cli, serve_http

REPO = "someone/tiny-edit"
COMMIT = "c0ffee" + "0" * 34


@pytest.fixture
def hub(tiny_model_dir):
    """Serves tiny_model_dir as REPO: repo info, file HEAD/GET under /resolve/REV/, an empty tree listing."""
    asked: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def reply(self, body: bytes, headers: dict, status: int = 200):
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def do_GET(self):
            asked.append(f"{self.command} {self.path}")
            path = self.path.split("?")[0]
            if path.startswith(f"/api/models/{REPO}/tree/"):
                return self.reply(b"[]", {"Content-Type": "application/json"})
            if path == f"/api/models/{REPO}" or path.startswith(f"/api/models/{REPO}/revision/"):
                info = {"id": REPO, "sha": COMMIT, "siblings": [{"rfilename": p.name} for p in tiny_model_dir.iterdir()]}
                return self.reply(json.dumps(info).encode(), {"Content-Type": "application/json"})
            prefix = f"/{REPO}/resolve/"
            name = path[len(prefix):].partition("/")[2] if path.startswith(prefix) else ""
            file = tiny_model_dir / name
            if not name or not file.is_file():
                return self.reply(b"", {"X-Error-Code": "EntryNotFound"}, 404)
            data = file.read_bytes()
            self.reply(data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": COMMIT})

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    with serve_http(Handler) as url:
        yield url, asked


def test_a_hub_id_is_downloaded_and_scored_as_itself_when_the_hub_is_reachable(hub, tiny_model_dir, eval_data_dir,
                                                                              tmp_path):
    from recipes.provenance import model_fingerprint

    endpoint, asked = hub
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = run_cli("-m", "launcher", "eval", f"model={REPO}", f"data={eval_data_dir}", "rm=null",
                   f"out={tmp_path / 'out'}", "eval.max_new_tokens=4", "eval.max_rows=2", "eval.bootstrap_samples=100",
                   env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"GET /{REPO}/resolve/{COMMIT}/model.safetensors" in asked  # the weights came from the hub
    model = json.loads((tmp_path / "out" / "report.json").read_text())["meta"]["provenance"]["model"]
    snapshot = tmp_path / "hf" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert model["path"] == REPO and Path(model["resolved"]) == snapshot
    assert model["fingerprint"] == model_fingerprint(tiny_model_dir)  # what was served is what was scored
    assert (model["dtype"], model["dtype_from"]) == ("float32", "config.json")
