"""`python -m rlhf_ops.cli.train_ppo_ray`: the RL loop with its models in Ray actor groups.

The options of `train_ppo` plus the reference's Ray ones (`rlhf_ops.rl.ray_config`). Inside
`ray job submit` it joins the job's cluster (RAY_ADDRESS; with token auth, RAY_AUTH_MODE=token and
RAY_AUTH_TOKEN too), otherwise it starts a local Ray on 127.0.0.1 and stops it at the end.
"""
from __future__ import annotations

import sys

from rlhf_ops.cli import stage_main
from rlhf_ops.rl.ray_config import RayPPOConfig

PROG = "python -m rlhf_ops.cli.train_ppo_ray"


def main(argv: list[str] | None = None) -> dict:
    from rlhf_ops.ray_rl.group import RoleDied

    try:
        return stage_main(PROG, RayPPOConfig, "rlhf_ops.ray_rl.run:train_ppo_ray", argv)
    except RoleDied as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
