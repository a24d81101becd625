"""Publish a trained model directory to the Hugging Face Hub, with a generated model card.

    info = load_card_info("runs/tiny")                      # metrics, params, data hashes, lineage
    card = model_card("me/tiny-rlhf", **info)
    url = push_to_hub("runs/tiny/rl", "me/tiny-rlhf", card=card)   # token from HF_TOKEN

The card (README.md) is written into a temporary mirror of the model directory (symlinks to the
original files plus the card), so the user's directory is never modified and the push is a single
commit. The repo is created private unless asked otherwise. The token is taken from the argument
or `HF_TOKEN` only (never from a stored login, so what is used is explicit), and it is scrubbed from
every message this module logs or raises. Telemetry is off for the calls.

`huggingface_hub` is imported inside the functions that need it, so `import rlhf_ops.hub` is cheap.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rlhf_ops.config import ConfigError

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload model trained with rlhf-ops"
CARD_NAME = "README.md"
BASE_TAGS = ("rlhf", "rlhf-ops")
# Hub repo ids: `name` or `namespace/name`; letters, digits, `-`, `_`, `.`; no `--`/`..`; at most 96 chars.
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
# Anything shaped like a Hugging Face user access token, redacted even when it is not *the* token.
_HF_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_SCAN_LIMIT = 16 * 1024 * 1024  # files up to this size are checked for the token before upload
REDACTED = "***"


class HubError(RuntimeError):
    """The push could not be done (no token, offline mode, a Hub/HTTP failure); the message says
    why and never contains the token."""


# --------------------------------------------------------------------------- small pure helpers


def redact(text: str, token: str | None) -> str:
    """`text` with the token (and anything shaped like an `hf_...` token) replaced by `***`."""
    if token:
        text = text.replace(token, REDACTED)
    return _HF_TOKEN_SHAPE.sub(REDACTED, text)


def resolve_token(token: str | None = None) -> str:
    """The token to push with: the argument, else `HF_TOKEN`. A stored `huggingface-cli login`
    token is deliberately not used, so a push never happens under an identity nobody named."""
    token = token or os.environ.get("HF_TOKEN") or None
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN to a token with write access "
                       "(https://huggingface.co/settings/tokens)")
    return token


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if it is a valid Hub model id (`name` or `namespace/name`), else ConfigError."""
    if not (isinstance(repo_id, str) and _REPO_ID.match(repo_id) and len(repo_id.split("/")[-1]) <= 96
            and "--" not in repo_id and ".." not in repo_id and not repo_id.endswith((".", "-"))):
        raise ConfigError(f"repo id {repo_id!r} is not a Hub repo name: expected 'name' or 'namespace/name' "
                          "(letters, digits, '-', '_', '.'; no '--' or '..')")
    return repo_id


def check_model_folder(folder: str | os.PathLike, what: str = "model folder") -> Path:
    """The folder as a Path, after checking it is a saved Hugging Face model (has config.json).
    `what` names it in the error (the CLI passes its flag)."""
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"{what} {path}: no such directory")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{what} {path} has no config.json: not a saved Hugging Face model "
                          "(point it at a stage's output directory, e.g. <run_dir>/rl)")
    return path


def _looks_like_hub_id(name: str | None) -> bool:
    """Local paths (./x, /x, a/b/c, ~/x) are not Hub ids; the Hub rejects them in `base_model:`."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and bool(_REPO_ID.match(name))


def _fmt(value: Any) -> str:
    """A metric value for the table: floats to 6 significant digits, the rest as text."""
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.6g}"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, Any]:
    """Nested metric dicts as one level with dotted names: {"rl": {"reward": 1}} -> {"rl.reward": 1}."""
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_metrics(value, f"{name}."))
        else:
            out[name] = value
    return out


def _stages(lineage: list[dict], params: dict) -> list[str]:
    """Stage names in pipeline order (lineage first, then any params-only stage), without repeats."""
    seen: list[str] = []
    for stage in [str(e.get("stage")) for e in lineage if e.get("stage")] + [str(s) for s in params]:
        if stage not in seen:
            seen.append(stage)
    return seen


# --------------------------------------------------------------------------- the model card


def model_card(repo_id: str, *, metrics: dict, params: dict, data_hashes: dict, lineage: list[dict],
               base_model: str | None = None) -> str:
    """The README.md of the pushed repo: YAML front matter (library_name, tags, base_model when it
    is a Hub id) and sections for the summary, evaluation metrics, per-stage training parameters,
    data files with their sha256, the lineage (stage -> output -> artifact hash, in order) and how
    to load the model. Pure and deterministic: metrics, data files and parameter keys are sorted;
    stage order (params, lineage) is kept, since it is the pipeline's order."""
    import yaml

    stages = _stages(lineage, params)
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                             "tags": [*BASE_TAGS, *(s for s in stages if s not in BASE_TAGS)]}
    if _looks_like_hub_id(base_model):
        front["base_model"] = base_model
    lines = ["---", yaml.safe_dump(front, sort_keys=False, default_flow_style=False).rstrip(), "---", "",
             f"# {repo_id.split('/')[-1]}", "", "## Summary", ""]
    through = f" through the stages {' -> '.join(f'`{s}`' for s in stages)}" if stages else ""
    lines.append(f"A causal language model trained with rlhf-ops (an RLHF pipeline){through}.")
    if base_model:
        lines += ["", f"Base model: `{base_model}`."]

    lines += ["", "## Evaluation", ""]
    flat = flatten_metrics(metrics)
    if flat:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {_cell(name)} | {_cell(_fmt(flat[name]))} |" for name in sorted(flat)]
    else:
        lines.append("No evaluation metrics were recorded.")

    lines += ["", "## Training parameters", ""]
    if params:
        for stage, stage_params in params.items():
            body = yaml.safe_dump(stage_params, sort_keys=True, default_flow_style=False).rstrip()
            lines += [f"### {stage}", "", "```yaml", body, "```", ""]
        lines.pop()
    else:
        lines.append("No training parameters were recorded.")

    lines += ["", "## Data", ""]
    if data_hashes:
        lines += ["| file | sha256 |", "|---|---|"]
        lines += [f"| {_cell(str(f))} | `{data_hashes[f]}` |" for f in sorted(data_hashes)]
    else:
        lines.append("No data manifest was recorded.")

    lines += ["", "## Lineage", ""]
    if lineage:
        lines += ["| # | stage | output | sha256 |", "|---|---|---|---|"]
        lines += [f"| {i} | {_cell(str(e.get('stage', '')))} | {_cell(str(e.get('output', '')))} | "
                  f"`{e.get('sha256', '')}` |" for i, e in enumerate(lineage, 1)]
    else:
        lines.append("No lineage was recorded.")

    lines += ["", "## How to load", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
              f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", "",
              "A private repo needs a token with read access (`HF_TOKEN`, or `token=`).", ""]
    return "\n".join(lines)


def _read_json(path: Path, expect: type) -> Any:
    """JSON of `path` (None when the file is missing); malformed or mis-shaped -> ConfigError naming it."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, expect):
        raise ConfigError(f"{path}: expected a JSON {'object' if expect is dict else 'array'}, "
                          f"got {type(data).__name__}")
    return data


def load_card_info(run_dir: str | os.PathLike) -> dict:
    """The card's inputs from a run directory, as keyword arguments of `model_card`:
    `eval/metrics.json` -> metrics, `data/manifest.json` ("files": {rel: {"sha256"}}) -> data_hashes,
    `lineage.json` (a list of {"stage", "output", "sha256"}) -> lineage, `params.json`
    (stage -> params) -> params. A missing file gives an empty section; malformed JSON is a
    ConfigError naming the file."""
    run = Path(run_dir)
    metrics = _read_json(run / "eval" / "metrics.json", dict) or {}
    params = _read_json(run / "params.json", dict) or {}
    manifest = _read_json(run / "data" / "manifest.json", dict) or {}
    lineage = _read_json(run / "lineage.json", list) or []
    files = manifest.get("files") or {}
    if not isinstance(files, dict):
        raise ConfigError(f"{run / 'data' / 'manifest.json'}: 'files' must be an object of path -> {{rows, sha256}}")
    hashes = {str(rel): (info.get("sha256", "") if isinstance(info, dict) else "") for rel, info in files.items()}
    if any(not isinstance(e, dict) for e in lineage):
        raise ConfigError(f"{run / 'lineage.json'}: expected a list of {{stage, output, sha256}} objects")
    return {"metrics": metrics, "params": params, "data_hashes": hashes, "lineage": lineage}


# --------------------------------------------------------------------------- the push


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


@contextmanager
def _hub_settings() -> Iterator[None]:
    """Telemetry off and offline mode as the environment says *now*, for the duration of the calls.

    huggingface_hub reads HF_HUB_DISABLE_TELEMETRY / HF_HUB_OFFLINE once, at import, into
    `huggingface_hub.constants`; a process that imported it earlier (or whose env changed since)
    would otherwise keep stale values. Both the env var and the constants are restored after."""
    old_env = os.environ.get("HF_HUB_DISABLE_TELEMETRY")
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    from huggingface_hub import constants

    offline = _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")
    saved = constants.HF_HUB_DISABLE_TELEMETRY, constants.HF_HUB_OFFLINE
    constants.HF_HUB_DISABLE_TELEMETRY, constants.HF_HUB_OFFLINE = True, offline
    try:
        if offline:
            raise HubError("offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): unset it to push")
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY, constants.HF_HUB_OFFLINE = saved
        if old_env is None:
            os.environ.pop("HF_HUB_DISABLE_TELEMETRY", None)
        else:
            os.environ["HF_HUB_DISABLE_TELEMETRY"] = old_env


def _model_files(folder: Path) -> list[Path]:
    """Files to upload, relative to `folder`, sorted; a top-level README.md is replaced by the card
    and `.git`/`.cache` are never uploaded."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if d not in (".git", ".cache"))
        for name in files:
            rel = (Path(root) / name).relative_to(folder)
            if rel != Path(CARD_NAME):
                out.append(rel)
    return sorted(out)


def _check_no_token(files: list[Path], folder: Path, card: str, token: str) -> None:
    """Refuse to upload the token: the card and every file up to 16 MiB (configs, tokenizer,
    templates) are searched for it. Weight files are larger and are binary tensors."""
    if token in card:
        raise HubError("the model card contains the Hugging Face token; refusing to upload it")
    needle = token.encode()
    for rel in files:
        path = folder / rel
        if path.stat().st_size <= _SCAN_LIMIT and needle in path.read_bytes():
            raise HubError(f"{path} contains the Hugging Face token; refusing to upload it")


def _mirror(folder: Path, files: list[Path], card: str, dest: Path) -> None:
    """`dest` := symlinks to `folder`'s files plus README.md = `card` (a copy where links fail)."""
    import shutil

    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink((folder / rel).resolve(), target)
        except OSError:
            shutil.copy2(folder / rel, target)
    (dest / CARD_NAME).write_text(card, encoding="utf-8")


def _version() -> str | None:
    """rlhf-ops' version for the User-Agent (None when the package metadata is unavailable)."""
    from importlib import metadata

    try:
        return metadata.version("rlhf-ops")
    except metadata.PackageNotFoundError:
        return None


def _hub_failure(e: BaseException, token: str, repo_id: str, endpoint: str) -> HubError:
    """One redacted line for a failed Hub call, with the HTTP status when there is one."""
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = {401: " (is the token valid?)", 403: " (does the token have write access to this namespace?)"}
    msg = f"push of {repo_id} to {endpoint} failed: " + (f"HTTP {status}{hint.get(status, '')}: " if status else "")
    return HubError(redact(msg + f"{type(e).__name__}: {first}", token))


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = True,
                endpoint: str | None = None, card: str | None = None,
                commit_message: str = DEFAULT_COMMIT_MESSAGE) -> str:
    """Create `repo_id` (private unless `private=False`; an existing repo is reused) and upload
    every file of `folder` plus README.md = `card` (a card with empty sections when None) in one
    commit. Returns the commit URL. `endpoint` defaults to HF_ENDPOINT, then the public Hub.

    Bad input (folder, repo id) is a ConfigError; no token, offline mode or any Hub/HTTP failure
    is a HubError whose message never contains the token."""
    src = check_model_folder(folder)
    check_repo_id(repo_id)
    token = resolve_token(token)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if card is None:
        card = model_card(repo_id, metrics={}, params={}, data_hashes={}, lineage=[])
    files = _model_files(src)
    _check_no_token(files, src, card, token)
    visibility = "private" if private else "public"
    logger.info("pushing %d files + %s from %s to %s/%s (%s)", len(files), CARD_NAME, src, endpoint, repo_id,
                visibility)
    with _hub_settings(), tempfile.TemporaryDirectory(prefix="rlhf_ops_push_") as tmp:
        _mirror(src, files, card, Path(tmp))
        try:
            from huggingface_hub import HfApi

            api = HfApi(endpoint=endpoint, token=token, library_name="rlhf-ops", library_version=_version())
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            info = api.upload_folder(repo_id=repo_id, folder_path=tmp, repo_type="model",
                                     commit_message=commit_message)
        except Exception as e:  # noqa: BLE001 - every failure leaves as one redacted HubError
            raise _hub_failure(e, token, repo_id, endpoint) from None
    url = str(getattr(info, "commit_url", None) or repo_url)
    logger.info("pushed %s: %s", repo_id, redact(url, token))
    return redact(url, token)
