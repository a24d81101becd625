"""The `rlhf` Prefect flow, its caching and resume, Ray jobs, and `dvc repro`, on the `ci` preset.

The `ci` preset (params/presets/ci) runs every stage in seconds on a 2-layer model: these tests
check orchestration, not learning. Each flow run is a subprocess with its own PREFECT_HOME
(ephemeral server, cache records and results isolated per test module).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _helpers import ROOT, subprocess_env

STAGES = ["prep", "sft", "rm", "rl", "eval"]


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("prefect_home")
    env = subprocess_env()
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
               PREFECT_LOGGING_LEVEL="INFO")
    env.pop("PREFECT_API_URL", None)
    return env


def flow(run: Path, env: dict, *extra: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.rlhf", "--preset", "ci", "--output_dir", str(run), "--executor", "local", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def states(log: str) -> dict[str, str]:
    """{stage: final state} from the flow's "stage X: State" lines."""
    out = {}
    for line in log.splitlines():
        if " - stage " in line and ": " in line.split(" - stage ", 1)[1]:
            name, state = line.split(" - stage ", 1)[1].split(": ", 1)
            out[name.strip()] = state.strip()
    return out


@pytest.mark.slow
def test_flow_runs_every_stage_then_hits_the_cache_and_rebuilds_a_deleted_output(tmp_path, prefect_env):
    run = tmp_path / "run"
    first = flow(run, prefect_env)
    assert first.returncode == 0, first.stdout[-6000:]
    assert states(first.stdout) == {s: "Completed" for s in STAGES}, first.stdout[-3000:]
    lineage = json.loads((run / "lineage.json").read_text())
    assert [r["stage"] for r in lineage] == STAGES and all(r["outputs"] for r in lineage)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert {"base", "sft", "rl"} <= set(metrics) and 0.0 <= metrics["rl"]["accuracy"] <= 1.0
    assert f"eval report: {run / 'eval' / 'report.md'}" in first.stdout
    for s in STAGES:  # each stamp times the stage's own commands and the hashing of its outputs
        stamp = json.loads((run / ".stamps" / f"{s}.json").read_text())
        assert stamp["work_s"] > 0.5 and 0.0 <= stamp["hash_s"] < stamp["work_s"], (s, stamp)

    second = flow(run, prefect_env)
    assert second.returncode == 0, second.stdout[-6000:]
    assert states(second.stdout) == {s: "Cached" for s in STAGES}  # 5 cache hits, nothing rerun

    shutil.rmtree(run / "rm")  # as `dvc repro -f` or a user would: the cache must not return the missing model
    third = flow(run, prefect_env)
    assert third.returncode == 0, third.stdout[-6000:]
    got = states(third.stdout)
    assert got["rm"] == "Completed" and got["prep"] == got["sft"] == "Cached", got
    assert (run / "rm" / "config.json").is_file()


@pytest.mark.slow
def test_a_killed_run_resumes_with_finished_stages_from_cache_and_rl_from_its_checkpoint(tmp_path, prefect_env):
    run = tmp_path / "run"
    longer_rl = json.dumps({"rl": {"max_samples": 48}})  # 12 RL steps, a checkpoint after each
    cmd = [sys.executable, "-m", "flows.rlhf", "--preset", "ci", "--output_dir", str(run), "--executor", "local",
           "--overrides", longer_rl]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=prefect_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (run / "ckpt" / "rl" / "latest_good").exists():
            assert proc.poll() is None, "the flow ended before the RL stage wrote a checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the flow and its stage subprocess, mid-RL
        proc.wait()
    assert not (run / "rl").exists()

    again = flow(run, prefect_env, "--overrides", longer_rl)
    assert again.returncode == 0, again.stdout[-6000:]
    got = states(again.stdout)
    assert [s for s, v in got.items() if v == "Cached"] == ["prep", "sft", "rm"], got  # 3 cache hits
    assert got["rl"] == got["eval"] == "Completed"
    assert f"resumed from {run / 'ckpt' / 'rl'}" in again.stdout
    train = [json.loads(x) for x in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["split"] == "train"][-1] == 12


@pytest.mark.parametrize("extra,message", [
    (["--stages", "prep,dance"], "unknown stage 'dance'"),
    (["--overrides", '{"sft": {"learning_rat": 0.1}}'], "learning_rat"),
    (["--overrides", '{"sft": {"max_epochs": "many"}}'], "max_epochs"),
])
def test_bad_plans_fail_before_any_stage_runs(tmp_path, prefect_env, extra, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("mine")
    out = flow(run, prefect_env, *extra)
    assert out.returncode != 0 and message in out.stdout, out.stdout[-3000:]
    assert " - stage " not in out.stdout and sorted(p.name for p in run.iterdir()) == ["keep.txt"]


def test_unknown_preset_names_the_presets(tmp_path, prefect_env):
    out = subprocess.run([sys.executable, "-m", "flows.rlhf", "--preset", "huge", "--output_dir", str(tmp_path / "r")],
                         cwd=ROOT, env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=300)
    assert out.returncode != 0 and "unknown preset 'huge'" in out.stdout and "tiny" in out.stdout


@pytest.mark.slow
def test_ray_jobs_on_a_local_head_stream_logs_and_fail_with_the_tail(tmp_path):
    from tasks.ray_jobs import JobFailed, local_head, run_job

    lines: list[str] = []
    # started with SIGINT ignored, as in a background job (`make run &`, nohup): the head must stay stoppable
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with local_head(num_cpus=1, log=lines.append) as address:
            signal.signal(signal.SIGINT, ignored)
            assert address.startswith("http://127.0.0.1:") and os.environ["RAY_AUTH_MODE"] == "token"
            run_job(address, [sys.executable, "-c", "print('hello from a job'); print('second line')"], "ok",
                    log=lines.append, poll_s=0.2)
            assert "hello from a job" in lines and "second line" in lines
            with pytest.raises(JobFailed, match=r"(?s)FAILED.*about to fail"):
                run_job(address, [sys.executable, "-c", "print('about to fail'); raise SystemExit(3)"], "bad",
                        log=lines.append, poll_s=0.2)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert "RAY_AUTH_TOKEN" not in os.environ  # restored after the head is gone
    with pytest.raises(Exception):
        from ray.job_submission import JobSubmissionClient
        JobSubmissionClient(address).list_jobs()  # the head we started is stopped
    # stopped by SIGINT, which `ray start --block` honours after a job (SIGTERM it ignores), and cleaned up
    stop = [ln for ln in lines if ln.startswith("local Ray head stopped in ")]
    assert len(stop) == 1 and "(it exited on SIGINT)" in stop[0] and stop[0].endswith(" removed"), stop
    assert not Path(stop[0].split("its temp dir ")[1].split()[0]).exists()

    lines.clear()
    with pytest.raises(RuntimeError, match="the flow failed"):
        with local_head(num_cpus=1, log=lines.append):
            raise RuntimeError("the flow failed")
    stop = [ln for ln in lines if ln.startswith("local Ray head stopped in ")]
    assert len(stop) == 1 and stop[0].endswith(" kept for its logs"), stop
    kept = Path(stop[0].split("its temp dir ")[1].split()[0])
    assert (kept / "session_latest" / "logs").is_dir()
    shutil.rmtree(kept)


@pytest.mark.slow
def test_flow_stages_run_as_ray_jobs_on_a_local_head_it_starts_and_stops_and_a_cached_rerun_starts_none(tmp_path, prefect_env):
    run = tmp_path / "run"
    env = {k: v for k, v in prefect_env.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "flows.rlhf", "--preset", "ci", "--output_dir", str(run), "--stages", "prep,sft"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-6000:]
    assert states(out.stdout) == {"prep": "Completed", "sft": "Completed"}
    assert "local Ray head up at http://127.0.0.1:" in out.stdout
    assert out.stdout.count("submitted Ray job rlhf-") == 2 and "Task run 'sft' - <== stage sft done" in out.stdout
    assert (run / "sft" / "config.json").is_file()
    head = [line for line in out.stdout.splitlines() if "local Ray head up at" in line][0]
    address = head.split("local Ray head up at ")[1].split()[0]
    with pytest.raises(OSError):  # the head the flow started is gone
        import urllib.request
        urllib.request.urlopen(f"{address}/api/version", timeout=5)

    again = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stdout[-6000:]
    assert states(again.stdout) == {"prep": "Cached", "sft": "Cached"}
    assert "local Ray head up" not in again.stdout and "submitted Ray job" not in again.stdout  # nothing to run, no head


@pytest.mark.slow
def test_dvc_repro_then_nothing_then_only_downstream_of_a_params_change(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("rlhf_ops", "params", "flows", "tasks"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / ".dvc").mkdir()
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    (repo / ".dvc" / ".gitignore").write_text("/config.local\n/tmp\n/cache\n")
    text = (ROOT / "dvc.yaml").read_text().replace("preset: tiny", "preset: ci").replace("run: runs/tiny", "run: runs/ci")
    (repo / "dvc.yaml").write_text(text)
    env = subprocess_env()
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", DVC_NO_ANALYTICS="1",
               DVC_SITE_CACHE_DIR=str(tmp_path / "dvc_site"), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def sh(*cmd: str, timeout: float = 900) -> str:
        out = subprocess.run(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             timeout=timeout)
        assert out.returncode == 0, f"{' '.join(cmd)}:\n{out.stdout[-6000:]}"
        return out.stdout

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    first = sh("dvc", "repro")
    assert all(f"Running stage '{s}'" in first for s in STAGES), first[-3000:]
    assert (repo / "runs" / "ci" / "eval" / "metrics.json").is_file() and (repo / "dvc.lock").is_file()
    second = sh("dvc", "repro")
    assert "Running stage" not in second and "up to date" in second
    rl_yaml = repo / "params" / "presets" / "ci" / "rl.yaml"
    rl_yaml.write_text(rl_yaml.read_text().replace("actor_learning_rate: 1.0e-4", "actor_learning_rate: 2.0e-4"))
    third = sh("dvc", "repro")
    ran = [s for s in STAGES if f"Running stage '{s}'" in third]
    assert ran == ["rl", "eval"], third[-3000:]
    sh("dvc", "push")  # to the repo's default local remote (.dvc/config: ../.dvc-storage)
    assert any((repo / ".dvc-storage").rglob("*"))


@pytest.mark.slow
def test_deployment_serves_runs_to_completion_and_keeps_its_schedule(tmp_path):
    """`prefect server start` on 127.0.0.1, `python -m flows.serve`, `prefect deployment run --watch`."""
    from rlhf_ops.distributed.engine import free_port
    from rlhf_ops.utils.net import wait_for_http

    port, run, prefect = free_port(), tmp_path / "run", str(Path(sys.executable).with_name("prefect"))
    env = subprocess_env()
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_RUNNER_POLL_FREQUENCY="1",
               PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "home" / "storage"))
    procs = []

    def start(*cmd: str) -> subprocess.Popen:
        log = open(tmp_path / f"{len(procs)}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))
        return procs[-1]

    def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([prefect, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)

    try:
        server = start(prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port))
        up = wait_for_http(f"http://127.0.0.1:{port}/api/health", 180, alive=lambda: server.poll() is None)
        assert up, (tmp_path / "0.log").read_text()[-3000:]
        start(sys.executable, "-m", "flows.serve", "--preset", "ci", "--output_dir", str(run), "--executor", "local")
        deadline = time.monotonic() + 180
        while (inspect := cli("deployment", "inspect", "rlhf/full-pipeline")).returncode != 0:
            assert time.monotonic() < deadline, (tmp_path / "1.log").read_text()[-3000:]
            time.sleep(2)
        assert "0 3 * * 1" in inspect.stdout  # the ci preset's schedule (pipeline.yaml)

        done = cli("deployment", "run", "rlhf/full-pipeline", "--watch", timeout=900)
        assert done.returncode == 0 and "Completed" in done.stdout, done.stdout[-3000:] + (tmp_path / "1.log").read_text()[-3000:]
        assert [r["stage"] for r in json.loads((run / "lineage.json").read_text())] == STAGES

        bad = cli("deployment", "run", "rlhf/full-pipeline", "--param", "preset=huge", "--watch", timeout=300)
        assert bad.returncode != 0 and "Failed" in bad.stdout, bad.stdout[-3000:]
        assert "unknown preset 'huge'" in (tmp_path / "1.log").read_text()
        assert [r["stage"] for r in json.loads((run / "lineage.json").read_text())] == STAGES  # nothing lost
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # `prefect` may ignore the first SIGTERM
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
