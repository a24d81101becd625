"""Run a stage's command as a Ray job: on the cluster at RAY_ADDRESS, or on a local head we start.

`local_head()` starts `ray start --head --block` in its own process group, bound to 127.0.0.1,
with usage stats off and token authentication on (a fresh random token per head, passed through
RAY_AUTH_TOKEN; clients need RAY_AUTH_MODE=token too). Leaving the context terminates that process
group only: Ray processes this project did not start are never touched (no `ray stop`).

`run_job()` submits the command, forwards the job's log lines to a callback as they arrive, and
raises `JobFailed` with the tail of the log when the job does not succeed.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
TAIL_LINES = 40
# environment passed to jobs: threads, accelerator, offline/telemetry switches (never HF_TOKEN)
PASS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY",
            "TRANSFORMERS_OFFLINE", "WANDB_MODE", "TOKENIZERS_PARALLELISM", "CUDA_VISIBLE_DEVICES", "PYTHONPATH")


class JobFailed(RuntimeError):
    """A Ray job ended in FAILED or STOPPED; the message holds the job's status message and log tail."""


def _free_port() -> int:
    from rlhf_ops.distributed.engine import free_port
    return free_port()


def _auth_env(token: str) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


@contextlib.contextmanager
def _env(extra: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_DEFAULT_SIGINT_EXEC = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                        "os.execv(sys.argv[1], sys.argv[1:])")


@contextlib.contextmanager
def local_head(num_cpus: int | None = None, startup_timeout: float = 180.0, log: Callable[[str], None] = print
               ) -> Iterator[str]:
    """Start a single-node Ray head on 127.0.0.1 for the duration of the block; yields its job address."""
    token = secrets.token_hex(24)
    gcs, dash = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rlhf-ray-")  # short path: Ray's socket names must stay < 108 bytes
    env = {**os.environ, **_auth_env(token), "RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_USAGE_STATS": "1"}
    # SIGINT back to its default first: a process started in the background (`cmd &`, nohup) inherits it ignored,
    # and so would the head, which is stopped with SIGINT (`_stop_group`)
    cmd = [sys.executable, "-c", _DEFAULT_SIGINT_EXEC, str(Path(sys.executable).with_name("ray")), "start", "--head",
           "--block", f"--port={gcs}",
           "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--num-cpus={num_cpus or os.cpu_count() or 1}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    ok = False
    try:
        _wait_ready(address, token, proc, startup_timeout)
        log(f"local Ray head up at {address} in {time.perf_counter() - t0:.1f} s (127.0.0.1 only, token auth)")
        with _env(_auth_env(token)):
            yield address
        ok = True
    finally:
        t1 = time.perf_counter()
        how = _stop_group(proc)
        if ok:  # its session logs: the jobs' output was streamed already; kept after a failure, for its logs
            shutil.rmtree(temp_dir, ignore_errors=True)
        log(f"local Ray head stopped in {time.perf_counter() - t1:.1f} s ({how}); its temp dir {temp_dir} "
            + ("removed" if ok else "kept for its logs"))


class BackgroundHead:
    """`local_head()` entered in a thread when `needed()` says so, so that the head's ~3 s start overlaps
    other start-up work (`python -m flows.rlhf` starts it next to the flow's temporary Prefect server).
    `address()` waits for it (None when it was not needed); `close()` stops it (idempotent)."""

    def __init__(self, needed: Callable[[], bool], log: Callable[[str], None] = print):
        import threading

        self._needed, self._log = needed, log
        self._cm: contextlib.AbstractContextManager | None = None
        self._address: str | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._start, name="ray-head-start", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            if self._needed():
                cm = local_head(log=self._log)
                self._address = cm.__enter__()
                self._cm = cm
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by address()
            self._error = e

    def address(self) -> str | None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._address

    def close(self, failed: bool = False) -> None:
        """Stop the head; after a failed flow (`failed`) its temp dir, with the session logs, is kept."""
        self._thread.join()
        if self._cm is not None and not self._closed:
            self._closed = True
            if failed:  # what local_head() sees when its block raises: it keeps the logs and says where
                err = RuntimeError("the flow failed")
                self._cm.__exit__(type(err), err, None)
            else:
                self._cm.__exit__(None, None, None)


def _wait_ready(address: str, token: str, proc: subprocess.Popen, timeout: float) -> None:
    from rlhf_ops.utils.net import wait_for_http

    if wait_for_http(f"{address}/api/jobs/", timeout, headers={"Authorization": f"Bearer {token}"},
                     alive=lambda: proc.poll() is None, interval_s=0.5):
        return
    if proc.poll() is not None:
        out = proc.stdout.read() if proc.stdout else ""
        raise RuntimeError(f"`ray start --head` exited with code {proc.returncode}:\n{out[-3000:]}")
    raise TimeoutError(f"the local Ray head did not answer at {address} within {timeout:.0f} s")


def _stop_group(proc: subprocess.Popen, grace_s: float = 5.0) -> str:
    """SIGINT our head's process group, SIGKILL what is left after `grace_s`; says which ended it.

    `ray start --block` takes SIGINT as Ctrl-C: it stops the processes it started and exits
    (measured here: 1.5 s, after a job ran). SIGTERM is no use: once the head has run a job,
    `ray start --block` ignores it for good (30 s waited, then killed). The head is ours and
    ephemeral, so whatever outlives the grace is killed; Ray processes we did not start are
    never touched (no `ray stop`)."""
    how = "it exited on SIGINT"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        how = f"killed after {grace_s:g} s"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    time.sleep(0.5)  # the group's other members get the same signal; give them a moment
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    return how


def job_env() -> dict[str, str]:
    return {k: os.environ[k] for k in PASS_ENV if k in os.environ}


def _submit(client, entrypoint: str, submission_id: str, agent_timeout_s: float) -> str:
    """submit_job, retried while the head's job agent is not up yet (a fresh head's dashboard answers
    before its agent registers: "No available agent to submit job")."""
    deadline = time.monotonic() + agent_timeout_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                     runtime_env={"env_vars": job_env()})
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def run_job(address: str, argv: list[str], name: str, log: Callable[[str], None] = print,
            poll_s: float = 0.2, logs_every_s: float = 1.0, agent_timeout_s: float = 120.0) -> str:
    """Submit `argv` as a Ray job, stream its log to `log`, return the job id; JobFailed on failure.

    The job's status is polled every `poll_s` (a small request: the end of a job is seen within
    ~0.1 s on average, not 0.5 s as with 1 s polling) and its log, which the API returns whole, every
    `logs_every_s` and once at the end."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    entrypoint = shlex.join(argv)
    job_id = _submit(client, entrypoint, f"{name}-{secrets.token_hex(4)}", agent_timeout_s)
    log(f"submitted Ray job {job_id} to {address}: {entrypoint}")
    seen, lines, split = 0, [], LogLines()
    last_logs = float("-inf")
    while True:
        status = client.get_job_status(job_id).value
        done = status in TERMINAL
        if done or time.monotonic() - last_logs >= logs_every_s:
            last_logs = time.monotonic()
            text = client.get_job_logs(job_id)
            end = len(text) if done else text.rfind("\n", seen) + 1  # whole lines only, until the end
            if end > seen:
                for line in split(text[seen:end]):
                    lines.append(line)
                    log(line)
                seen = end
        if done:
            break
        time.sleep(poll_s)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        tail = "\n".join(lines[-TAIL_LINES:])
        raise JobFailed(f"Ray job {job_id} ({name}) {status}: {info.message or ''}\n--- last {TAIL_LINES} log lines ---\n{tail}")
    return job_id


_BAR = re.compile(r"^(?P<label>.*?)(?P<pct>\d{1,3})%\|")


class LogLines:
    """Turn a stage's raw output into log lines: a progress bar's carriage-return redraws keep their
    last state, and a bar is logged at each 10% step and at 100%, not at every update."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def __call__(self, chunk: str) -> list[str]:
        out = []
        for line in chunk.split("\n"):
            line = line.rsplit("\r", 1)[-1].rstrip()
            if line and self._keep(line):
                out.append(line)
        return out

    def _keep(self, line: str) -> bool:
        m = _BAR.match(line)
        if not m:
            return True
        label, pct = m.group("label"), int(m.group("pct"))
        last = self._last.get(label, -10)
        if pct == 100 or pct // 10 > last // 10 or pct < last:
            self._last[label] = pct
            return True
        return False
