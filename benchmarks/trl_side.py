"""The TRL side of benchmarks/trl_compare.py: one TRL training run, described by a JSON spec.

    .venv-bench/bin/python benchmarks/trl_side.py SPEC.json

Runs inside the TRL venv (`.venv-bench`: torch 2.13.0 CPU + trl 1.16), never in the project's
venv. It does not import the project's library: the harness hands it plain files (pre-tokenized
rows, prompt texts), so both sides train on the very same token ids in the same order. The one
exception is the GRPO reward: the built-in reward file `rlhf_ops/rewards/arith.py` and the
module it imports (`rlhf_ops/data/arith.py`, standard library only) are loaded by file path,
so TRL scores completions with the same code as our RL loop; nothing else of `rlhf_ops` (no
torch code) is loaded, and the script checks that.

spec keys: kind (sft | rm | grpo), model, data (JSONL), out (result JSON), threads, steps
(optimizer steps), seed, lr, warmup_ratio, adam_betas, max_norm, and per kind:
  sft:  max_length, batch (rows per optimizer step), packing (bool)
  rm:   max_length, micro (pairs per forward), accum (micro-batches per optimizer step)
  grpo: micro (completions per forward), accum, steps_per_generation, num_generations,
        max_completion_length, temperature, beta, reward_file, prompt_ids (our token ids of the
        prompts, to check that TRL tokenizes them identically), save_model (optional: a folder for
        the trained policy, in Hugging Face format)

Result JSON: step_end (seconds since train begin at the end of each optimizer step, from a
TrainerCallback's on_step_end), train_runtime (Trainer's own figure), tokens/rows per optimizer
step as the loss saw them, GRPO phase timings per generation round, maxrss_kb (this process's
peak RSS, getrusage), versions, threads, log_history.
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import tempfile
import time
import types
from pathlib import Path


def _rows(path: str) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def _common(spec: dict, out_dir: str) -> dict:
    """TrainingArguments shared by the three trainers, matched to our engine's settings."""
    b1, b2 = spec["adam_betas"]
    return dict(output_dir=out_dir, max_steps=spec["steps"], learning_rate=spec["lr"],
                lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
                warmup_steps=spec["warmup_ratio"], adam_beta1=b1, adam_beta2=b2, weight_decay=0.0,
                max_grad_norm=spec["max_norm"], logging_steps=1, save_strategy="no", report_to="none",
                seed=spec["seed"], data_seed=spec["seed"], use_cpu=True,
                # TRL's configs default to bf16 and gradient checkpointing; ours trains fp32 without checkpointing
                bf16=False, fp16=False, gradient_checkpointing=False,
                dataloader_num_workers=0, disable_tqdm=False, model_init_kwargs={"dtype": "float32"})


def _step_clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """perf_counter at train begin and at the end of every optimizer step."""

        def __init__(self) -> None:
            self.t0 = None
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter() - self.t0)

    return StepClock()


def _count_tokens(inputs: dict) -> tuple[int, int, int]:
    """(real tokens, computed tokens incl. padding, samples) of one micro-batch as the model sees it."""
    if "attention_mask" in inputs and inputs["attention_mask"] is not None and inputs["attention_mask"].dim() == 2:
        am = inputs["attention_mask"]
        return int(am.sum()), int(am.numel()), int(am.shape[0])
    pos = inputs["position_ids"]  # padding-free: one row, position ids restart at each sample
    return int(pos.numel()), int(pos.numel()), int((pos == 0).sum())


def run_sft(spec: dict, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    micro: list[tuple[int, int, int]] = []

    class CountingSFT(SFTTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                micro.append(_count_tokens(inputs))
            return super().compute_loss(model, inputs, *a, **kw)

    ds = Dataset.from_list(_rows(spec["data"]))  # input_ids + completion_mask, in our step order
    args = SFTConfig(**_common(spec, out_dir), per_device_train_batch_size=spec["batch"],
                     gradient_accumulation_steps=1, max_length=spec["max_length"], packing=spec["packing"],
                     completion_only_loss=True, shuffle_dataset=False,
                     # unpacked: our exact micro-batches in our order; packed: TRL's bins, drawn at random
                     train_sampling_strategy="random" if spec["packing"] else "sequential")
    tok = AutoTokenizer.from_pretrained(spec["model"])
    clock = _step_clock()
    trainer = CountingSFT(model=spec["model"], args=args, train_dataset=ds, processing_class=tok, callbacks=[clock])
    out = trainer.train()
    return dict(clock=clock, train_runtime=out.metrics["train_runtime"], micro=micro, accum=1,
                log_history=trainer.state.log_history)


def run_rm(spec: dict, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    micro: list[tuple[int, int, int]] = []

    class CountingRM(RewardTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            if model.training:
                micro.append(_count_tokens(inputs))
            return super().compute_loss(model, inputs, *a, **kw)

    ds = Dataset.from_list(_rows(spec["data"]))  # chosen_ids + rejected_ids, in our micro-batch order
    args = RewardConfig(**_common(spec, out_dir), per_device_train_batch_size=spec["micro"],
                        gradient_accumulation_steps=spec["accum"], max_length=spec["max_length"],
                        train_sampling_strategy="sequential")
    tok = AutoTokenizer.from_pretrained(spec["model"])
    clock = _step_clock()
    trainer = CountingRM(model=spec["model"], args=args, train_dataset=ds, processing_class=tok, callbacks=[clock])
    out = trainer.train()
    return dict(clock=clock, train_runtime=out.metrics["train_runtime"], micro=micro, accum=spec["accum"],
                log_history=trainer.state.log_history)


def _load_reward(path: str):
    """Our reward file by path, with its one import (rlhf_ops.data.arith, stdlib only) also by path."""
    root = Path(path).resolve().parents[2]
    for name in ("rlhf_ops", "rlhf_ops.data"):
        pkg = types.ModuleType(name)
        pkg.__path__ = []  # a bare namespace: nothing of the package's __init__ runs
        sys.modules[name] = pkg
    spec = importlib.util.spec_from_file_location("rlhf_ops.data.arith", root / "rlhf_ops" / "data" / "arith.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rlhf_ops.data.arith"] = mod
    spec.loader.exec_module(mod)
    spec = importlib.util.spec_from_file_location("bench_reward", path)
    rew = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rew)
    loaded = sorted(m for m in sys.modules if m.startswith("rlhf_ops"))
    assert loaded == ["rlhf_ops", "rlhf_ops.data", "rlhf_ops.data.arith"], loaded
    return rew


def run_grpo(spec: dict, out_dir: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rew = _load_reward(spec["reward_file"])

    def arith_reward(prompts, completions, label, **kw):
        # our loop calls reward_func(queries = prompt + completion text, prompts, labels)
        out = rew.reward_func([p + c for p, c in zip(prompts, completions)], list(prompts), list(label))
        return out["rewards"]

    rows = _rows(spec["data"])  # {"prompt": text, "label": ...} in our step order
    tok = AutoTokenizer.from_pretrained(spec["model"])
    trl_ids = tok([r["prompt"] for r in rows])["input_ids"]
    same_prompt_ids = trl_ids == spec["prompt_ids"]
    ds = Dataset.from_list(rows)
    args = GRPOConfig(**_common(spec, out_dir), per_device_train_batch_size=spec["micro"],
                      gradient_accumulation_steps=spec["accum"], steps_per_generation=spec["steps_per_generation"],
                      num_generations=spec["num_generations"], max_completion_length=spec["max_completion_length"],
                      temperature=spec["temperature"], top_p=1.0, top_k=0, beta=spec["beta"],
                      use_bias_correction_kl=False, epsilon=0.2, loss_type="dapo", scale_rewards="group",
                      num_iterations=1, shuffle_dataset=False)
    clock = _step_clock()
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=arith_reward, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[clock])
    # phase timers: wrap the trainer's own methods (timing only, behaviour unchanged)
    phases: list[dict] = []

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                if name == "generate_and_score":
                    phases.append({})
                    phases[-1][name] = time.perf_counter() - t
                    phases[-1].update(pending)
                    pending.clear()
                else:
                    pending[name] = pending.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    pending: dict[str, float] = {}
    trainer._generate = timed("generate", trainer._generate)
    trainer._calculate_rewards = timed("score", trainer._calculate_rewards)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    comp_tokens: list[int] = []
    inner = trainer._compute_loss

    def counting_loss(model, inputs):
        comp_tokens.append(int(inputs["completion_mask"].sum()))
        return inner(model, inputs)

    trainer._compute_loss = counting_loss
    out = trainer.train()
    if spec.get("save_model"):  # benchmarks/rl_accuracy_vs_trl.py evaluates the trained policy
        trainer.save_model(spec["save_model"])
        tok.save_pretrained(spec["save_model"])
    return dict(clock=clock, train_runtime=out.metrics["train_runtime"], micro=[], accum=spec["accum"],
                log_history=trainer.state.log_history, phases=phases, completion_tokens=comp_tokens,
                same_prompt_ids=same_prompt_ids)


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    n = int(spec["threads"])
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    import torch

    torch.set_num_threads(n)
    import transformers
    import trl

    with tempfile.TemporaryDirectory(prefix="trl_side_") as out_dir:
        res = {"sft": run_sft, "rm": run_rm, "grpo": run_grpo}[spec["kind"]](spec, out_dir)
    clock = res.pop("clock")
    micro, accum = res.pop("micro"), res.pop("accum")
    steps = [micro[i:i + accum] for i in range(0, len(micro), accum)] if micro else []
    result = {
        "step_end": clock.ends,
        "train_runtime": res.pop("train_runtime"),
        "tokens_per_step": [sum(m[0] for m in s) for s in steps],
        "computed_tokens_per_step": [sum(m[1] for m in s) for s in steps],
        "rows_per_step": [sum(m[2] for m in s) for s in steps],
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        **res,
    }
    Path(spec["out"]).write_text(json.dumps(result, default=float) + "\n")


if __name__ == "__main__":
    main()
