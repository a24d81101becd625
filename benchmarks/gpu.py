"""GPU figures (issue 7, item 5): SFT model FLOPs utilisation, an RL step's phases, weight-sync time.

    python benchmarks/gpu.py --out DIR            # on a machine with a CUDA GPU
    python benchmarks/gpu.py --smoke --out DIR    # the same code on this CPU, tiny model, fp32

On a GPU it builds a randomly initialised Llama of about 0.47B parameters (hidden 1024, 28 layers,
16 heads, intermediate 4096; the project's own 512-token tokenizer, so the LM head is small) in
bf16 and measures, each through the project's own entry points:

* **SFT MFU**: `train_sft --pretrain_mode --packing_samples --bf16` on synthetic rows of exactly
  `--seq_len` tokens, `--batch` rows per optimizer step (one packed micro-batch). Model FLOPs per
  token are 6 x parameters + 6 x layers x hidden x seq_len (causal attention, forward and
  backward), divided by the time per step (`seconds` in metrics.jsonl, steps 2..N) and by the
  card's dense bf16 peak (`--peak_tflops`, or the table below by device name). The run's last two
  steps are recorded with `--profile_steps` (left out of the median): device time against wall
  time per step, host syncs, and the top ops of the trainer's step (`sft_trainer_ops.md`).
* **RL step**: `train_ppo` with the tiny GRPO preset (HF generation: the CUDA vLLM is not in this
  script's reach) in bf16, `--generate_max_len` tokens; the step's phases from metrics.jsonl.
* **Weight sync**: the actor's full weights gathered and packed on the GPU (`full_hf_state_dict`,
  `pack`), then broadcast by `WeightSender` with backend "nccl" in a group of one (it checks that
  the NCCL sender runs; NCCL takes one rank per GPU, so a receiving engine needs a second GPU) and
  with "gloo" to a receiver thread in host memory (the transport an engine on the same machine
  without a second GPU would get).
* **Profile**: the same model and packed batch without the trainer (forward, backward, AdamW in
  one process): its step time bounds the trainer's MFU, and torch.profiler's top kernels say where
  the device time goes. Also a plain 8192^3 bf16 matmul, the card's practical ceiling.

Each part is isolated: one that fails or passes `--part_timeout` is recorded as an error in the
results and the others still run; gpu.json and gpu.md are rewritten after every part, so a call
cut off at its limit keeps what it measured. `benchmarks/gpu_device.sh` is the lent machine's command.

`--smoke` runs all of it on the CPU with the 1.1M tiny model in fp32 and a few steps, so the
script is tested where CI runs; its figures are not GPU figures and are labelled so. Writes
gpu.json and gpu.md under --out. A benchmark: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from gpu_report import report  # noqa: E402  (benchmarks/ is on sys.path)

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, SXM where there are two
GPU_MODEL = {"hidden_size": 1024, "num_layers": 28, "num_heads": 16, "num_kv_heads": 16, "intermediate_size": 4096,
             "max_position_embeddings": 4096}
SMOKE_MODEL = {}  # make_tiny's defaults: hidden 128, 4 layers


def _run(argv: list[str], log: Path, env: dict, timeout_s: float | None = None) -> float:
    t = time.perf_counter()
    with log.open("w") as f:
        try:
            p = subprocess.run(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"timed out after {timeout_s} s: {' '.join(argv)}\n{log.read_text()[-4000:]}") from None
    if p.returncode:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(argv)}\n{log.read_text()[-4000:]}")
    return time.perf_counter() - t


def _train_rows(ckpt: Path) -> list[dict]:
    rows = [json.loads(x) for x in (ckpt / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["split"] == "train"]


def synthetic_rows(path: Path, model: Path, n: int, seq_len: int, seed: int = 0) -> Path:
    """`n` JSONL rows {"text": ...} of random arithmetic-corpus words, each at least `seq_len` tokens (checked
    with the model's tokenizer), so that --max_len `seq_len` truncates every row to exactly `seq_len`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rng = random.Random(seed)
    vocab = [str(i) for i in range(100)] + ["+", "-", "*", "=", "User:", "Assistant:", "the", "answer", "is"]
    path.mkdir(parents=True, exist_ok=True)
    with (path / "train.jsonl").open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(vocab) for _ in range(seq_len))
            if len(tok(text)["input_ids"]) < seq_len:
                raise RuntimeError(f"synthetic row {i} is shorter than {seq_len} tokens")
            f.write(json.dumps({"text": text}) + "\n")
    return path


def sft_mfu(work: Path, model: Path, params: int, sizes: dict, a: argparse.Namespace, env: dict, peak: float | None) -> dict:
    data = synthetic_rows(work / "sft_data", model, a.batch * a.sft_steps, a.seq_len)
    out = work / "sft"
    argv = [sys.executable, "-m", "rlhf_ops.cli.train_sft", "--pretrain", str(model), "--dataset", str(data),
            "--input_key", "text", "--pretrain_mode", "--max_len", str(a.seq_len), "--packing_samples",
            "--train_batch_size", str(a.batch), "--micro_train_batch_size", str(a.batch), "--max_epochs", "1",
            "--max_samples", str(a.batch * a.sft_steps), "--learning_rate", "1e-4", "--lr_warmup_ratio", "0",
            "--logging_steps", "1", "--zero_stage", "0", "--save_path", str(out / "model"),
            "--ckpt_path", str(out / "ckpt"), "--profile_steps", f"{a.sft_steps - 1}-{a.sft_steps}",
            *(["--bf16"] if not a.smoke else []), *a.extra_sft]
    wall = _run(argv, work / "sft.log", env, a.part_timeout)
    rows = _train_rows(out / "ckpt")
    secs = [rows[i]["seconds"] - rows[i - 1]["seconds"] for i in range(1, len(rows) - 2)]  # steps 2..N-2: not profiled
    tokens = a.batch * a.seq_len  # every row fills --max_len (truncated), packed into one micro-batch
    import re

    m = re.search(r"SFT data: (\d+) train rows \((\d+) tokens\)", (work / "sft.log").read_text())
    if not m or int(m.group(2)) != int(m.group(1)) * a.seq_len:
        raise RuntimeError(f"train_sft did not report {a.seq_len} tokens per row: {m.group(0) if m else 'no data line'}")
    engine = re.search(r"training engine: (.+)", (work / "sft.log").read_text())  # LocalEngine or DeepSpeed, as logged
    L, h = sizes.get("num_layers", 4), sizes.get("hidden_size", 128)
    flops_per_token = 6 * params + 6 * L * h * a.seq_len
    step_s = statistics.median(secs)
    achieved = flops_per_token * tokens / step_s
    prof = json.loads((out / "ckpt" / "profile" / "ops.json").read_text())
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "ckpt" / "profile" / "ops.md", a.out / "sft_trainer_ops.md")
    return {"trainer_profile": {k: prof[k] for k in ("steps", "first_step", "wall_s_per_step", "self_device_ms_per_step",
                                                    "host_syncs_per_step")} | {"top_ops": prof["ops"][:15]},
            "steps": len(rows), "tokens_per_step": tokens, "step_s_median": step_s, "step_s_min": min(secs),
            "tokens_per_s": tokens / step_s, "flops_per_token": flops_per_token, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (peak * 1e12) if peak else None, "peak_tflops": peak, "wall_s": wall,
            "engine": engine.group(1).strip() if engine else None, "command": " ".join(["python", *argv[1:]])}


def rl_step(work: Path, model: Path, a: argparse.Namespace, env: dict) -> dict:
    from rlhf_ops.data.prepare import write_dataset

    data = work / "rl_data"
    write_dataset(data, preset="tiny", seed=42)
    out = work / "rl"
    argv = [sys.executable, "-m", "rlhf_ops.cli.train_ppo", "--config", str(ROOT / "params/presets/tiny/rl.yaml"),
            "--pretrain", str(model), "--prompt_data", str(data / "prompts"),
            "--reward_func", str(ROOT / "rlhf_ops/rewards/arith.py"), "--max_samples", str(16 * a.rl_steps),
            "--generate_max_len", str(a.generate_max_len), "--eval_steps", "1000000", "--logging_steps", "1",
            "--save_path", str(out / "model"), "--ckpt_path", str(out / "ckpt"),
            *(["--bf16"] if not a.smoke else []), *a.extra_rl]
    wall = _run(argv, work / "rl.log", env, a.part_timeout)
    rows = _train_rows(out / "ckpt")[1:] or _train_rows(out / "ckpt")  # step 1 warms up
    step = statistics.median(r["time_step"] for r in rows)
    phases = {k: statistics.median(r[f"time_{k}"] for r in rows) for k in ("generate", "score", "logprobs", "train")}
    return {"steps_timed": len(rows), "step_s_median": step, "phase_s_median": phases,
            "phase_share": {k: v / step for k, v in phases.items()},
            "response_length": statistics.mean(r["response_length"] for r in rows), "wall_s": wall,
            "command": " ".join(["python", *argv[1:]])}


def weight_sync(model_dir: Path, smoke: bool) -> dict:
    """Gather + pack on the device, then one broadcast per transport this machine can run."""
    import torch

    from rlhf_ops.generation.vllm_engine import full_hf_state_dict
    from rlhf_ops.generation.vllm_server import WeightReceiver
    from rlhf_ops.generation.weight_sync import WeightSender, pack
    from rlhf_ops.models.loading import load_causal_lm

    device = "cpu" if smoke else "cuda"
    model = load_causal_lm(str(model_dir), bf16=not smoke).to(device)

    def timed(fn, reps: int = 3) -> float:
        best = float("inf")
        for _ in range(reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        return best

    sd = full_hf_state_dict(model, device)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    res: dict = {"bytes": nbytes, "gather_s": timed(lambda: full_hf_state_dict(model, device)),
                 "pack_s": timed(lambda: pack(sd))}
    if not smoke:  # NCCL in a group of one: the sender's code path on a real GPU (no receiver: one GPU)
        sender = WeightSender("127.0.0.1", 0, world=1, backend="nccl")
        sender.connect()
        res["nccl_self_broadcast_s"] = timed(lambda: sender.send(sd))
    sender = WeightSender("127.0.0.1", 0, world=2, backend="gloo")
    got: dict = {}

    def receive() -> None:
        try:
            r = WeightReceiver("127.0.0.1", sender.port, 1, 2, timeout_s=300)
            got["n"] = [len(r.receive()) for _ in range(3)]
        except BaseException as e:  # noqa: BLE001 - reported below
            got["error"] = repr(e)

    th = threading.Thread(target=receive, daemon=True)
    th.start()
    sender.connect()
    res["gloo_to_host_s"] = timed(lambda: sender.send(full_hf_state_dict(model, "cpu")))
    th.join(timeout=300)
    if "error" in got or got.get("n") != [len(sd)] * 3:
        raise RuntimeError(f"gloo receiver: {got}")
    return res


def profile_step(model_dir: Path, params: int, sizes: dict, a: argparse.Namespace, peak: float | None) -> dict:
    """Where an SFT step's device time goes, without the trainer: the same model (bf16 on a GPU, with the
    project's fast paths and packed attention) on one packed row of `batch` x `seq_len` tokens, forward,
    backward and AdamW, timed in-process (its MFU bounds what the trainer can reach), then two steps
    under torch.profiler: the ops with the most device (CPU under --smoke) time. Also the card's plain
    bf16 matmul rate (8192^3), the practical ceiling that the nominal peak overstates."""
    import torch
    import torch.nn.functional as F

    from rlhf_ops.models.loading import load_causal_lm

    dev = "cpu" if a.smoke else "cuda"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    res: dict = {}
    if dev == "cuda":
        x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            x @ x
        sync()
        t = time.perf_counter()
        for _ in range(10):
            x @ x
        sync()
        res["matmul_8192_tflops"] = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t) / 1e12
        del x
    liger = "--use_liger_kernel" in a.extra_sft  # profile what the SFT part ran
    model = load_causal_lm(str(model_dir), bf16=not a.smoke, use_liger_kernel=liger).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    n = a.batch * a.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(dev)
    pos = torch.arange(a.seq_len).repeat(a.batch)[None].to(dev)  # packed: positions restart per row

    def step() -> None:
        logits = model(input_ids=ids, position_ids=pos).logits
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    L, h = sizes.get("num_layers", 4), sizes.get("hidden_size", 128)
    step_s = statistics.median(times)
    achieved = (6 * params + 6 * L * h * a.seq_len) * n / step_s
    res.update(step_s_median=step_s, achieved_tflops=achieved / 1e12, mfu=achieved / (peak * 1e12) if peak else None)
    if dev == "cuda":
        res["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step()
        sync()
    if dev == "cuda":  # kernels (and copies) only: an aten op's device time would count its kernels twice
        key = "self_device_time_total"
        evs = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA and getattr(e, key) > 0]
    else:
        key = "self_cpu_time_total"
        evs = [e for e in prof.key_averages() if getattr(e, key) > 0]
    total = sum(getattr(e, key) for e in evs) or 1.0
    evs.sort(key=lambda e: getattr(e, key), reverse=True)
    res["top_ops"] = [{"name": e.key[:90], "calls": e.count // 2, "ms_per_step": getattr(e, key) / 2e3,
                       "share": getattr(e, key) / total} for e in evs[:25]]
    res["use_liger_kernel"] = liger
    res["profiled_ms_per_step"] = total / 2e3  # GPU: kernel-busy time; the rest of step_s is launch gaps
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--smoke", action="store_true", help="run on the CPU with the tiny model (tests the script)")
    ap.add_argument("--seq_len", type=int, default=None, help="SFT tokens per row (GPU 2048, smoke 64)")
    ap.add_argument("--batch", type=int, default=None, help="SFT rows per step (GPU 8, smoke 4)")
    ap.add_argument("--sft_steps", type=int, default=None, help="GPU 20, smoke 4")
    ap.add_argument("--rl_steps", type=int, default=None, help="GPU 4, smoke 2")
    ap.add_argument("--generate_max_len", type=int, default=None, help="GPU 256, smoke 16")
    ap.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak (default: by name)")
    ap.add_argument("--parts", default="sft,profile,sync,rl")
    ap.add_argument("--part_timeout", type=float, default=600, help="seconds each subprocess part may run")
    ap.add_argument("--logs", action="store_true", help="also copy the trainers' logs to --out (sft.log, rl.log)")
    ap.add_argument("--extra_sft", nargs="*", default=[], help="more train_sft flags (e.g. --flash_attn)")
    ap.add_argument("--extra_rl", nargs="*", default=[], help="more train_ppo flags")
    a = ap.parse_args()
    gpu_defaults = {"seq_len": 2048, "batch": 8, "sft_steps": 20, "rl_steps": 4, "generate_max_len": 256}
    smoke_defaults = {"seq_len": 64, "batch": 4, "sft_steps": 4, "rl_steps": 2, "generate_max_len": 16}
    for k, v in (smoke_defaults if a.smoke else gpu_defaults).items():
        if getattr(a, k) is None:
            setattr(a, k, v)

    import torch

    if not a.smoke and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device here, and GPU figures come only from a GPU; "
                         "--smoke runs the same code on this CPU with the tiny model")
    from rlhf_ops.models.tiny import make_tiny

    name = torch.cuda.get_device_name(0) if not a.smoke else "none (--smoke: CPU, tiny model, fp32)"
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None) if not a.smoke else None
    sizes = SMOKE_MODEL if a.smoke else GPU_MODEL
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)  # keep carried wheels' path
    env = dict(os.environ, PYTHONPATH=path, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    if a.smoke:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    parts = {p.strip() for p in a.parts.split(",")}
    res: dict = {"date": time.strftime("%Y-%m-%d %H:%M %z"), "device": name, "smoke": a.smoke,
                 "torch": torch.__version__, "model_sizes": sizes or "make_tiny defaults", "args": vars(a) | {"out": str(a.out)}}
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        work = Path(tmp)
        model = make_tiny(work / "model", seed=0, **sizes)
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
        res["params"] = params
        parts_fn = (("sft", lambda: sft_mfu(work, model, params, sizes, a, env, peak)),
                    ("profile", lambda: profile_step(model, params, sizes, a, peak)),
                    ("sync", lambda: weight_sync(model, a.smoke)), ("rl", lambda: rl_step(work, model, a, env)))
        failed = []
        for part, fn in parts_fn:
            if part not in parts:
                continue
            print(f"gpu.py: {part} ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            try:
                res[part] = fn()
            except Exception as e:  # noqa: BLE001 - one part's failure must not lose the others' figures
                import traceback

                traceback.print_exc()
                res[part] = {"error": f"{type(e).__name__}: {e}"[-3000:]}
                failed.append(part)
            print(f"gpu.py: {part} done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
            _write(a.out, res)  # after each part: a later part's crash or timeout keeps these
            if a.logs:
                for log in ("sft.log", "rl.log"):
                    if (work / log).exists():
                        shutil.copyfile(work / log, a.out / log)
    print(report(res))
    if failed:
        raise SystemExit(f"gpu.py: failed parts: {', '.join(failed)} (see gpu.json)")


def _write(out: Path, res: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu.json", json.dumps(res, indent=2) + "\n"), ("gpu.md", report(res) + "\n")):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


if __name__ == "__main__":
    main()
