"""`python -m flows.serve [--preset tiny] [--output_dir runs/tiny] [--cron "0 3 * * 1"]`: serve `rlhf/full-pipeline`.

Registers the deployment `rlhf/full-pipeline` with the Prefect API in PREFECT_API_URL (start one with
`prefect server start --host 127.0.0.1`) and serves it from this process, so that
`prefect deployment run rlhf/full-pipeline --param preset=tiny` runs the flow here. The schedule is
`--cron`, else the preset's `pipeline.yaml` `schedule` (none: runs only when asked). Deployment
parameters are the flow's: a preset name plus overrides ({stage: {option: value}}).
"""
from __future__ import annotations

import argparse
import sys

DEPLOYMENT = "full-pipeline"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--output_dir", default="runs/tiny")
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--cron", default=None, help="schedule (default: the preset's pipeline.yaml `schedule`)")
    a = ap.parse_args(argv)

    from flows.settings import read_plan_file
    from rlhf_ops.config import ConfigError
    try:
        cron = a.cron or read_plan_file(a.preset).get("schedule")
    except ConfigError as e:
        print(f"python -m flows.serve: error: {e}", file=sys.stderr)
        return 2
    from flows.rlhf import rlhf
    rlhf.serve(name=DEPLOYMENT, cron=cron,
               parameters={"preset": a.preset, "output_dir": a.output_dir, "executor": a.executor},
               description="SFT -> RM -> RL -> eval on one preset, every stage cached and retried")
    return 0


if __name__ == "__main__":
    sys.exit(main())
