"""What orchestration costs: the full tiny pipeline, a fully cached rerun, and a resume after an RL failure.

    .venv/bin/python benchmarks/orchestration.py [--preset tiny] [--run_dir runs/bench-orch] [--executor ray]

Runs the Prefect flow exactly as `make run` does (`python -m flows.rlhf`, stages as Ray jobs on a
local head the flow starts), three times:

1. **full run** from an empty run directory. Each stage's stamp (`<run>/.stamps/<stage>.json`)
   records `work_s`, the wall time of the stage's own commands (data prep, trainers, generation,
   eval: the work), and `hash_s`, the time spent hashing its outputs. Everything else in the flow's
   wall time is orchestration: Python and Prefect start-up, the Ray head, job submission and log
   streaming, cache-key hashing, lineage. The table splits the run into work, output hashing and
   the rest.
2. **cached rerun** of the same flow: every stage should be a cache hit. Twice: with the
   temporary Prefect server `python -m flows.rlhf` starts when no server is configured (what
   `make run` does), and against a long-lived `prefect server start` on 127.0.0.1 (what a
   deployment, `prefect deployment run rlhf/full-pipeline`, always has), started here and
   stopped afterwards; its start-up is not counted.
3. **resume**: the RL stage is run again under a new seed (a new cache key), killed once its
   checkpoint passes `--kill_after_step`, and the flow is rerun. Both use `--executor local`
   (stages as plain subprocesses), so that killing the flow's process group kills the stage too;
   a Ray job would outlive a killed flow. The rerun's wall time is set
   against the RL stage's work time in the full run (what running that stage alone from scratch
   costs).

RL checkpoints every `--save_steps` (8) steps in all three runs (`{"rl": {"save_steps": 8}}`
overrides), so they are comparable. Writes benchmarks/results/orchestration.{json,md}. It asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prep", "sft", "rm", "rl", "eval"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0",
               DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def _flow_cmd(args: argparse.Namespace, overrides: dict, executor: str) -> list[str]:
    return [sys.executable, "-m", "flows.rlhf", "--preset", args.preset, "--output_dir", str(args.run_dir),
            "--executor", executor, "--overrides", json.dumps(overrides)]


def _timed_flow(args: argparse.Namespace, overrides: dict, log: Path, executor: str, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(_flow_cmd(args, overrides, executor), cwd=ROOT, env=env or _env(), stdout=f,
                             stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"the flow failed (exit code {rc}); its log: {log}")
    return wall


@contextlib.contextmanager
def _prefect_server(log: Path):
    """A `prefect server start` on 127.0.0.1 (this benchmark's own; stopped on exit); yields its API URL."""
    from rlhf_ops.distributed.engine import free_port
    from rlhf_ops.utils.net import wait_for_http

    port = free_port()
    prefect = str(Path(sys.executable).with_name("prefect"))
    with log.open("w") as f:
        proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT,
                                env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        if not wait_for_http(f"http://127.0.0.1:{port}/api/health", 180, alive=lambda: proc.poll() is None):
            raise SystemExit(f"prefect server did not come up; its log: {log}")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # `prefect server` may ignore the first SIGTERM
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _stamps(run: Path) -> dict[str, dict]:
    out = {}
    for s in STAGES:
        p = run / ".stamps" / f"{s}.json"
        if p.exists():
            out[s] = json.loads(p.read_text())
    return out


def _ray_head_s(log: Path) -> float | None:
    m = re.search(r"local Ray head up at \S+ in ([0-9.]+) s", log.read_text())
    return float(m.group(1)) if m else None


def _cached_states(log: Path) -> int:
    return sum(1 for line in log.read_text().splitlines() if re.search(r" - stage \w+: Cached", line))


def _kill_rl_after(args: argparse.Namespace, overrides: dict, log: Path) -> int:
    """Start the flow, kill its whole process group once RL's checkpoint passes the step; returns that step."""
    pointer = args.run_dir / "ckpt" / "rl" / "latest_good"
    with log.open("w") as f:
        proc = subprocess.Popen(_flow_cmd(args, overrides, "local"), cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    step, deadline, started = 0, time.monotonic() + 3600, time.time()
    try:
        while step < args.kill_after_step:
            if proc.poll() is not None:
                raise SystemExit(f"the flow ended before RL checkpointed step {args.kill_after_step}; log: {log}")
            if time.monotonic() > deadline:
                raise SystemExit("no RL checkpoint within an hour")
            if pointer.exists() and pointer.stat().st_mtime > started:  # not the full run's last checkpoint
                digits = re.findall(r"\d+", pointer.read_text())
                step = int(digits[-1]) if digits else 0
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the flow and its stage subprocesses (local executor)
            proc.wait()
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--run_dir", type=Path, default=ROOT / "runs" / "bench-orch")
    ap.add_argument("--executor", default="ray", choices=["ray", "local"])
    ap.add_argument("--save_steps", type=int, default=8, help="RL checkpoint interval in all three runs")
    ap.add_argument("--kill_after_step", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    args.run_dir = args.run_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / "orchestration_logs"
    logs.mkdir(exist_ok=True)
    load0 = os.getloadavg()[0]
    base = {"rl": {"save_steps": args.save_steps}}

    shutil.rmtree(args.run_dir, ignore_errors=True)
    full = _timed_flow(args, base, logs / "full.log", args.executor)
    stamps = _stamps(args.run_dir)
    work = {s: st.get("work_s", 0.0) for s, st in stamps.items()}
    hashing = sum(st.get("hash_s", 0.0) for st in stamps.values())
    head = _ray_head_s(logs / "full.log")

    cached = _timed_flow(args, base, logs / "cached.log", args.executor)
    hits = _cached_states(logs / "cached.log")
    with _prefect_server(logs / "prefect_server.log") as api:
        served = _timed_flow(args, base, logs / "cached_served.log", args.executor, dict(_env(), PREFECT_API_URL=api))
    served_hits = _cached_states(logs / "cached_served.log")

    resumed_over = {"rl": {"save_steps": args.save_steps, "seed": 43}}
    killed_at = _kill_rl_after(args, resumed_over, logs / "killed.log")
    resume = _timed_flow(args, resumed_over, logs / "resume.log", "local")
    resumed = "resumed from" in (logs / "resume.log").read_text()

    rerun_stamps = _stamps(args.run_dir)
    rerun_eval, rerun_rl = (rerun_stamps.get(s, {}).get("work_s", 0.0) for s in ("eval", "rl"))
    total_work = sum(work.values())
    orch = full - total_work - hashing
    rows = [
        ("full run, wall", f"{full:.1f} s", "`python -m flows.rlhf` from an empty run dir"),
        ("  stage work (sum of `work_s`)", f"{total_work:.1f} s ({100 * total_work / full:.1f}%)",
         ", ".join(f"{s} {v:.1f}" for s, v in work.items())),
        ("  output hashing (sum of `hash_s`)", f"{hashing:.1f} s ({100 * hashing / full:.1f}%)", "sha256 of every stage's outputs"),
        ("  orchestration (the rest)", f"{orch:.1f} s ({100 * orch / full:.1f}%)",
         f"Prefect, Ray head ({head:.1f} s to start)" if head is not None else "Prefect, subprocesses"),
        ("cached rerun, wall", f"{cached:.1f} s", f"{hits}/{len(STAGES)} stages Cached; the flow's temporary Prefect server"),
        ("cached rerun against a running Prefect server", f"{served:.1f} s",
         f"{served_hits}/{len(STAGES)} stages Cached; PREFECT_API_URL of a `prefect server start` (as a deployment has)"),
        ("resume after RL killed at step " + str(killed_at), f"{resume:.1f} s",
         f"whole flow rerun, `--executor local` ({'resumed' if resumed else 'NOT resumed'} from the RL checkpoint)"),
        ("  of which eval (reruns: RL's output changed)", f"{rerun_eval:.1f} s", "eval's `work_s` in the resumed flow"),
        ("  RL stage alone, from scratch", f"{work.get('rl', 0.0):.1f} s", "its `work_s` in the full run"),
        ("  RL stage resumed", f"{rerun_rl:.1f} s", "RL's `work_s` in the resumed flow"),
    ]
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load_start": load0, "load_end": os.getloadavg()[0], "preset": args.preset, "executor": args.executor,
              "command": " ".join(["python", *sys.argv]), "full_s": full, "work_s": work, "hash_s": hashing,
              "orchestration_s": orch, "ray_head_s": head, "cached_s": cached, "cached_hits": hits,
              "cached_served_s": served, "cached_served_hits": served_hits, "resume_eval_s": rerun_eval,
              "resume_rl_s": rerun_rl,
              "killed_at_step": killed_at, "resume_s": resume, "resumed": resumed}
    md = ["| what | time | how |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
          f"{result['date']}, {result['machine']}, load {load0:.2f} -> {result['load_end']:.2f}; "
          f"command: {result['command']}", ""]
    (args.out / "orchestration.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "orchestration.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
