"""`python -m rlhf_ops.cli.push_to_hub`: publish a trained model directory to the Hugging Face Hub.

    HF_TOKEN=hf_... python -m rlhf_ops.cli.push_to_hub --model_path runs/tiny/rl \\
        --repo_id me/tiny-rlhf --run_dir runs/tiny

Creates the repo (private unless `--public`; an existing one is reused) and uploads every file of
`--model_path` plus a generated README.md model card in one commit; prints the commit URL. With
`--run_dir` the card carries the run's evaluation metrics, per-stage parameters, data hashes and
lineage (see `rlhf_ops.hub.load_card_info`); without it those sections say nothing was recorded.
The token comes from HF_TOKEN only (never a flag, so it stays out of shell history and process
lists) and never appears in what is logged, raised or uploaded.

Refused with a clear error and exit code 2, before anything is sent: a `--model_path` that is not a
directory holding config.json, a malformed `--repo_id`, a missing `--run_dir`, malformed JSON in
it, no HF_TOKEN, offline mode. Hub failures (auth, network, HTTP errors) also exit 2 with one line.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rlhf_ops.config import ConfigError, check, opt, parse_config

PROG = "python -m rlhf_ops.cli.push_to_hub"


@dataclass(frozen=True)
class PushToHubConfig:
    """Push a trained model directory to the Hugging Face Hub with a generated model card (token: HF_TOKEN)."""
    model_path: str = opt(None, "Saved Hugging Face model directory to upload (holds config.json)", required=True)
    repo_id: str = opt(None, "Hub repo to create or update: 'name' or 'namespace/name'", required=True)
    public: bool = opt(False, "Create the repo public (it is private by default)")
    endpoint: Optional[str] = opt(None, "Hub URL; when unset, HF_ENDPOINT, else https://huggingface.co")
    run_dir: Optional[str] = opt(None, "Run directory whose eval/metrics.json, params.json, data/manifest.json "
                                       "and lineage.json fill the model card")
    base_model: Optional[str] = opt(None, "Base model named in the card (a Hub id also goes in its metadata)")
    commit_message: str = opt("Upload model trained with rlhf-ops", "Message of the commit on the Hub")

    def __post_init__(self) -> None:
        from rlhf_ops.hub import check_repo_id

        check(bool(self.model_path), "model_path", "must be a non-empty path")
        check(bool(self.commit_message and self.commit_message.strip()), "commit_message", "must not be empty")
        try:
            check_repo_id(self.repo_id)
        except ConfigError as e:
            raise ConfigError(f"--repo_id: {e}") from None


def build_card(cfg: PushToHubConfig) -> str:
    """The model card for `cfg`: the run's records when --run_dir is given, empty sections otherwise."""
    from rlhf_ops.hub import load_card_info, model_card

    info = {"metrics": {}, "params": {}, "data_hashes": {}, "lineage": []}
    if cfg.run_dir is not None:
        if not Path(cfg.run_dir).is_dir():
            raise ConfigError(f"--run_dir {cfg.run_dir}: no such directory")
        info = load_card_info(cfg.run_dir)
    return model_card(cfg.repo_id, base_model=cfg.base_model, **info)


def push(cfg: PushToHubConfig) -> str:
    """Check the inputs, build the card, push; returns the commit URL."""
    from rlhf_ops.hub import check_model_folder, push_to_hub, resolve_token

    check_model_folder(cfg.model_path, what="--model_path")
    resolve_token()  # fail on a missing HF_TOKEN before reading the run directory
    return push_to_hub(cfg.model_path, cfg.repo_id, private=not cfg.public, endpoint=cfg.endpoint,
                       card=build_card(cfg), commit_message=cfg.commit_message)


def main(argv: Sequence[str] | None = None) -> str:
    from rlhf_ops.cli import run_stage
    from rlhf_ops.hub import HubError
    from rlhf_ops.utils.logs import setup_logging

    cfg = parse_config(PushToHubConfig, argv, prog=PROG)
    setup_logging()
    try:  # run_stage maps ConfigError to exit 2; hub failures get the same one-line treatment here
        url = run_stage(PROG, push, cfg)
    except HubError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"pushed {cfg.model_path} to {cfg.repo_id} ({'public' if cfg.public else 'private'}): {url}")
    return url


if __name__ == "__main__":
    main()
