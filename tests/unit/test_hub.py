"""rlhf_ops.hub and its CLI against a loopback HTTP server that plays the Hugging Face Hub.

The server records every request (method, path, headers, body) and answers just the endpoints
huggingface_hub calls for `create_repo` + `upload_folder`: repo creation, README metadata
validation, preupload (every file "regular", so contents travel inline, base64, in the commit) and
the NDJSON commit. Anything else is answered 404 and shows up in `hub.unknown`. No real Hub.
"""
from __future__ import annotations

import base64
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rlhf_ops.config import ConfigError
from rlhf_ops.hub import HubError, load_card_info, model_card, push_to_hub, redact

TOKEN = "hf_loopbackSecretToken0123456789abcdef"
COMMIT_OID = "a" * 40
USER = "fake-user"
FILES = {
    "config.json": b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}',
    "model.safetensors": bytes(range(7)) + b"\x00\xff",
    "tokenizer.json": b'{"version": "1.0", "model": {"type": "BPE"}}',
    "sub/extra.txt": b"nested file\n",
}


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def find(self, method: str, pattern: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and re.fullmatch(pattern, r["path"])]

    @property
    def unknown(self) -> list[dict]:
        return [r for r in self.requests if r["status"] == 404]

    def committed(self) -> dict[str, bytes]:
        """path -> bytes of every file in every commit's NDJSON payload."""
        out = {}
        for req in self.find("POST", r"/api/models/.+/commit/main"):
            for line in req["body"].splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    assert item["value"]["encoding"] == "base64"
                    out[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                else:
                    assert item["key"] == "header", item
        return out


def _full_id(repo: str) -> str:
    """As the Hub does, a repo named without a namespace belongs to the token's user."""
    return repo if "/" in repo else f"{USER}/{repo}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return data
                data += chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        server: FakeHub = self.server  # type: ignore[assignment]
        path = self.path.split("?")[0]
        body = self._body()
        status, answer = self._answer(server, path, body)
        with server.lock:
            server.requests.append({"method": self.command, "path": path, "headers": {k.lower(): v for k, v in self.headers.items()},
                                    "body": body, "status": status})
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _answer(self, server: FakeHub, path: str, body: bytes) -> tuple[int, dict]:
        if self.command == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo = _full_id(f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"])
            return 200, {"url": f"{server.url}/{repo}", "name": repo}
        if self.command == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        m = re.fullmatch(r"/api/models/(.+)/(preupload|commit)/main", path)
        if self.command == "POST" and m and m.group(2) == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}
        if self.command == "POST" and m:
            return 200, {"commitUrl": f"{server.url}/{_full_id(m.group(1))}/commit/{COMMIT_OID}",
                         "commitOid": COMMIT_OID}
        return 404, {"error": f"fake hub: no route for {self.command} {path}"}

    do_GET = do_POST = do_PUT = do_HEAD = _handle


@pytest.fixture
def hub(monkeypatch):
    """A running fake hub; the test environment's offline switch and endpoint are cleared."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def model_dir(tmp_path) -> Path:
    folder = tmp_path / "model"
    for rel, data in FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CARD_INFO = {
    "metrics": {"reward_mean": 0.8125, "win_rate": 0.5, "rl": {"kl": 0.0123456789}},
    "params": {"sft": {"learning_rate": 5e-6, "max_epochs": 1}, "ppo": {"init_kl_coef": 0.01}},
    "data_hashes": {"sft/train.jsonl": "ab" * 32, "preference/train.jsonl": "cd" * 32},
    "lineage": [{"stage": "sft", "output": "runs/x/sft", "sha256": "11" * 32},
                {"stage": "rm", "output": "runs/x/rm", "sha256": "22" * 32},
                {"stage": "ppo", "output": "runs/x/rl", "sha256": "33" * 32}],
}


# --------------------------------------------------------------------------- push_to_hub


def test_push_uploads_every_file_and_card_privately(hub, model_dir, monkeypatch, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    before = _snapshot(model_dir)
    card = model_card("me/tiny-rlhf", **CARD_INFO)
    with caplog.at_level(logging.DEBUG):
        url = push_to_hub(model_dir, "me/tiny-rlhf", endpoint=hub.url, card=card)

    assert url == f"{hub.url}/me/tiny-rlhf/commit/{COMMIT_OID}"
    assert not hub.unknown, hub.unknown
    assert [(r["method"], r["path"]) for r in hub.requests] == [
        ("POST", "/api/repos/create"), ("POST", "/api/validate-yaml"),
        ("POST", "/api/models/me/tiny-rlhf/preupload/main"), ("POST", "/api/models/me/tiny-rlhf/commit/main")]
    (create,) = hub.find("POST", "/api/repos/create")
    assert json.loads(create["body"]) == {"name": "tiny-rlhf", "organization": "me", "visibility": "private",
                                          "type": "model"}
    assert hub.committed() == {**FILES, "README.md": card.encode()}
    (commit,) = hub.find("POST", r"/api/models/me/tiny-rlhf/commit/main")
    header = json.loads(commit["body"].splitlines()[0])
    assert header["value"]["summary"] == "Upload model trained with rlhf-ops"
    for req in hub.requests:
        assert req["headers"].get("authorization") == f"Bearer {TOKEN}", req["path"]
    assert all("torch/" not in r["headers"].get("user-agent", "") for r in hub.requests)  # telemetry off
    assert _snapshot(model_dir) == before  # the source folder is untouched (no README.md written)
    out = capsys.readouterr()
    logged = caplog.text + out.out + out.err
    assert "me/tiny-rlhf" in caplog.text and TOKEN not in logged
    assert all(TOKEN.encode() not in data for data in hub.committed().values())


def test_push_public_and_existing_readme_replaced(hub, model_dir, monkeypatch):
    (model_dir / "README.md").write_text("old card")
    url = push_to_hub(model_dir, "solo-model", token=TOKEN, private=False, endpoint=hub.url,
                      commit_message="second upload")
    assert url == f"{hub.url}/{USER}/solo-model/commit/{COMMIT_OID}"
    (create,) = hub.find("POST", "/api/repos/create")
    assert json.loads(create["body"])["visibility"] == "public"
    assert json.loads(create["body"])["organization"] is None
    files = hub.committed()
    assert files["README.md"].decode().startswith("---\nlibrary_name: transformers\n")
    assert (model_dir / "README.md").read_text() == "old card"
    (commit,) = hub.find("POST", r"/api/models/solo-model/commit/main")
    assert json.loads(commit["body"].splitlines()[0])["value"]["summary"] == "second upload"


def test_push_endpoint_from_env(hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert push_to_hub(model_dir, "me/env-endpoint").startswith(hub.url)
    assert set(hub.committed()) == {*FILES, "README.md"}


def test_missing_token_is_a_clear_error(hub, model_dir):
    with pytest.raises(HubError, match="set HF_TOKEN"):
        push_to_hub(model_dir, "me/x", endpoint=hub.url)
    assert hub.requests == []


def test_offline_mode_is_a_clear_error(hub, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="offline"):
        push_to_hub(model_dir, "me/x", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_hub_failure_is_redacted(model_dir, monkeypatch, hub):
    """A server that echoes the token back in an error: the HubError must not carry it."""
    def answer(self, server, path, body):
        return 403, {"error": f"token {self.headers.get('authorization')} may not write here"}

    monkeypatch.setattr(_Handler, "_answer", answer)
    with pytest.raises(HubError) as err:
        push_to_hub(model_dir, "me/x", token=TOKEN, endpoint=hub.url)
    assert "HTTP 403" in str(err.value) and TOKEN not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__


def test_token_in_a_model_file_is_refused(hub, model_dir):
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"token": TOKEN}))
    with pytest.raises(HubError, match="tokenizer_config.json contains the Hugging Face token") as err:
        push_to_hub(model_dir, "me/x", token=TOKEN, endpoint=hub.url)
    assert TOKEN not in str(err.value) and hub.requests == []


@pytest.mark.parametrize("case", ["missing", "no_config"])
def test_bad_model_folder(tmp_path, case):
    folder = tmp_path / "m"
    if case == "no_config":
        folder.mkdir()
    with pytest.raises(ConfigError, match=re.escape(str(folder))):
        push_to_hub(folder, "me/x", token=TOKEN)


def test_redact():
    assert redact(f"Bearer {TOKEN} and hf_{'Z' * 30}", TOKEN) == "Bearer *** and ***"


# --------------------------------------------------------------------------- the card


def test_model_card_content():
    card = model_card("me/tiny-rlhf", base_model="org/base-7b", **CARD_INFO)
    assert card == model_card("me/tiny-rlhf", base_model="org/base-7b", **CARD_INFO)  # deterministic
    front = card.split("---\n")[1]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "org/base-7b"
    assert meta["tags"][:2] == ["rlhf", "rlhf-ops"] and {"sft", "rm", "ppo"} <= set(meta["tags"])
    for section in ("## Summary", "## Evaluation", "## Training parameters", "## Data", "## Lineage", "## How to load"):
        assert section in card
    assert "| reward_mean | 0.8125 |" in card and "| rl.kl | 0.0123457 |" in card
    assert f"| preference/train.jsonl | `{'cd' * 32}` |" in card
    assert "### sft\n\n```yaml\nlearning_rate: 5.0e-06\nmax_epochs: 1\n```" in card
    rows = [card.index(f"| {i} | {s} | runs/x/{o} | `{h * 32}` |") for i, s, o, h in
            [(1, "sft", "sft", "11"), (2, "rm", "rm", "22"), (3, "ppo", "rl", "33")]]
    assert rows == sorted(rows)
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-rlhf")' in card


def test_model_card_empty_and_local_base():
    card = model_card("x", metrics={}, params={}, data_hashes={}, lineage=[], base_model="runs/tiny/base_model")
    assert "base_model:" not in card.split("---\n")[1]  # a local path is not valid Hub metadata
    assert "Base model: `runs/tiny/base_model`" in card
    assert "No evaluation metrics were recorded." in card and "No lineage was recorded." in card


def test_load_card_info(tmp_path):
    assert load_card_info(tmp_path) == {"metrics": {}, "params": {}, "data_hashes": {}, "lineage": []}
    (tmp_path / "eval").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(CARD_INFO["metrics"]))
    (tmp_path / "params.json").write_text(json.dumps(CARD_INFO["params"]))
    (tmp_path / "lineage.json").write_text(json.dumps(CARD_INFO["lineage"]))
    manifest = {"preset": "tiny", "files": {k: {"rows": 3, "sha256": v} for k, v in CARD_INFO["data_hashes"].items()}}
    (tmp_path / "data" / "manifest.json").write_text(json.dumps(manifest))
    assert load_card_info(tmp_path) == CARD_INFO
    (tmp_path / "lineage.json").write_text("[{not json")
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "lineage.json"))):
        load_card_info(tmp_path)


# --------------------------------------------------------------------------- the CLI


def _cli(argv, capsys):
    from rlhf_ops.cli.push_to_hub import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err


def test_cli_missing_model_path_exits_2(tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    missing = tmp_path / "nope"
    code, err = _cli(["--model_path", str(missing), "--repo_id", "me/x", "--endpoint", hub.url], capsys)
    assert code == 2 and f"--model_path {missing}: no such directory" in err
    assert hub.requests == []


def test_cli_missing_token_exits_2(model_dir, hub, capsys):
    code, err = _cli(["--model_path", str(model_dir), "--repo_id", "me/x", "--endpoint", hub.url], capsys)
    assert code == 2 and "set HF_TOKEN" in err


def test_cli_bad_repo_id_exits_2(model_dir, capsys):
    code, err = _cli(["--model_path", str(model_dir), "--repo_id", "a/b/c"], capsys)
    assert code == 2 and "--repo_id" in err


def test_cli_pushes_with_run_dir(tmp_path, model_dir, hub, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.json").write_text(json.dumps({"win_rate": 0.75}))
    from rlhf_ops.cli.push_to_hub import main

    url = main(["--model_path", str(model_dir), "--repo_id", "me/cli", "--endpoint", hub.url, "--public",
                "--run_dir", str(run)])
    assert url == f"{hub.url}/me/cli/commit/{COMMIT_OID}"
    assert json.loads(hub.find("POST", "/api/repos/create")[0]["body"])["visibility"] == "public"
    assert "| win_rate | 0.75 |" in hub.committed()["README.md"].decode()
    out = capsys.readouterr()
    assert url in out.out and TOKEN not in out.out + out.err
