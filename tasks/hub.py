"""Hub push as a flow step: the RL model of a run, with a model card built from the run's records."""
from __future__ import annotations

from pathlib import Path


def push(run_dir: str, repo_id: str, private: bool = True) -> str:
    """Push `<run>/rl` to `repo_id` (token from HF_TOKEN); returns the URL. Never logs the token."""
    from rlhf_ops.hub import load_card_info, model_card, push_to_hub

    info = load_card_info(run_dir)
    card = model_card(repo_id, **info)
    url = push_to_hub(Path(run_dir) / "rl", repo_id, private=private, card=card)
    print(f"pushed {Path(run_dir) / 'rl'} to {url}")
    return url
