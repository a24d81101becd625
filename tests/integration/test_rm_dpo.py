"""Reward-model and DPO training end to end on DeepSpeed (CPU, gloo): CLIs in subprocesses.

* RM training on the built-in preference data reaches clearly-better-than-chance accuracy on the
  200 held-out pairs; the saved RM loads with HF's AutoModelForSequenceClassification and scores
  exactly as our own scoring; its config holds the eval reward mean/std;
* LoRA RM training saves an adapter that includes the value head;
* DPO raises the eval preference margin, and the frozen reference scores each pair once;
* the reference's RM command runs under the `deepspeed` launcher and writes a loadable model.

What the RM can learn here: the rejected answers carry one of four errors (`error` column, drawn
uniformly): an arithmetic slip, a miscopied operand, a wrong "Answer:" line, or a truncated solution.
A ~1M-parameter RM learns the truncation at once and the other three only partly. Measured
(held-out, this preset's RM params, 62 steps of 32 pairs, 2026-11-26): from the untrained tiny
model 0.695 (truncated 1.00, slip 0.67, copy 0.53, answer 0.46); from the tiny SFT model 0.735
(1.00, 0.62, 0.67, 0.58). Without truncated pairs, 600 steps from the SFT model stayed at
0.52-0.59, although the SFT model's own log-likelihood prefers the chosen side 90% of the time:
an RM this small needs the easy kind to start learning the others.

Fast checks of the DPO pieces (per-sample logps, the zero initial margin) run in-process first.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _helpers import subprocess_env as env
from rlhf_ops.distributed.engine import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEMPLATE = "User: {}\nAssistant: "
SIZES = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)
LOG_TAIL = 6000


def run(cmd: list[str], cwd: Path = ROOT, timeout: float = 420) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"exit code {proc.returncode}: {' '.join(cmd)}\n{proc.stdout[-LOG_TAIL:]}"
    return proc.stdout


def argv(opts: dict) -> list[str]:
    out: list[str] = []
    for k, v in opts.items():
        out += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return out


def metrics(path: Path, split: str) -> list[dict]:
    return [r for r in map(json.loads, Path(path).read_text().splitlines()) if r["split"] == split]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from rlhf_ops.models.tiny import make_tiny
    return make_tiny(tmp_path_factory.mktemp("rm_dpo") / "model", seed=0, **SIZES)


@pytest.fixture(scope="module")
def pref_opts(model_dir, builtin_data_dir) -> dict:
    return {"pretrain": model_dir, "dataset": builtin_data_dir / "preference", "prompt_key": "prompt",
            "input_template": TEMPLATE, "max_len": 128, "zero_stage": 0, "packing_samples": True, "seed": 42}


@pytest.fixture(scope="module")
def first_pairs(builtin_data_dir, tmp_path_factory) -> Path:
    """The first 64 training rows as their own file: trained on, and evaluated on."""
    lines = (builtin_data_dir / "preference" / "train.jsonl").read_text().splitlines()[:64]
    path = tmp_path_factory.mktemp("pairs") / "first64.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------------------ fast: the DPO pieces


def test_target_logprob_sums_match_a_per_sample_forward_padded_and_packed(model_dir, tiny_tokenizer, pref_opts):
    from transformers import AutoModelForCausalLM

    from rlhf_ops.data.preference import build_preference_set, pair_batch
    from rlhf_ops.models.forward import target_logprob_sums
    from rlhf_ops.trainers.dpo import DPOConfig

    cfg = DPOConfig(pretrain=str(model_dir), dataset=str(pref_opts["dataset"]), prompt_key="prompt",
                    input_template=TEMPLATE)
    ps = build_preference_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=6)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = ps.chosen_ids[:3] + ps.rejected_ids[:3]
    masks = ps.chosen_mask[:3] + ps.rejected_mask[:3]
    with torch.no_grad():
        want, counts = [], []
        for x, m in zip(ids, masks):  # one unpadded row at a time, from full logits
            logp = torch.log_softmax(model(torch.tensor([x])).logits[0].double(), -1)
            want.append(sum(logp[t, x[t + 1]] for t in range(len(x) - 1) if m[t + 1]))
            counts.append(sum(m[1:]))
        for packed in (False, True):
            pb = pair_batch(ps, [0, 1, 2], tiny_tokenizer.pad_token_id, packed=packed, device="cpu")
            sums, n = target_logprob_sums(model, pb.batch)
            # fp32 sums of ~30 logps of ~-6: measured max error 3e-5 (1.5e-7 relative)
            torch.testing.assert_close(sums.double(), torch.stack(want), rtol=5e-7, atol=1e-6)
            assert n.tolist() == counts


def test_dpo_starts_at_zero_margin_when_the_policy_is_the_reference(model_dir, tiny_tokenizer, pref_opts):
    from rlhf_ops.data.preference import build_preference_set, pair_batch_maker
    from rlhf_ops.models.loading import load_causal_lm
    from rlhf_ops.trainers.dpo import DPOConfig, dpo_batch_maker, dpo_step, reference_logps

    for ipo in (False, True):
        cfg = DPOConfig(pretrain=str(model_dir), dataset=str(pref_opts["dataset"]), prompt_key="prompt",
                        input_template=TEMPLATE, ipo=ipo)
        ps = build_preference_set(cfg, tiny_tokenizer, cfg.dataset, "train", max_samples=10)
        model = load_causal_lm(str(model_dir)).eval()
        kw = dict(packed=False, device="cpu")
        ref = reference_logps(model, ps, pair_batch_maker(ps, 0, packed=True, device="cpu"), 4,
                              average=ipo)  # another layout and chunking than the step's
        with torch.no_grad():
            loss, m = dpo_step(model, dpo_batch_maker(ps, ref, 0, **kw)(list(range(10))), cfg)
        assert abs(m["margin"][0]) < 1e-4 and abs(m["chosen_reward"][0]) < 1e-4
        want = math.log(2) if not ipo else (1 / (2 * cfg.beta)) ** 2
        assert loss.item() == pytest.approx(want, rel=1e-4)


@pytest.mark.parametrize("kw,message", [
    ({"beta": 0.0}, "--beta: must be > 0"),
    ({"ipo": True, "label_smoothing": 0.1}, "--label_smoothing: is a \\(c\\)DPO option"),
    ({"label_smoothing": 0.5}, r"--label_smoothing: must be in \[0, 0.5\)"),
    ({"ref_pretrain": "/no/such/model"}, "--ref_pretrain: /no/such/model does not exist"),
])
def test_bad_dpo_options_are_refused_with_the_option_named(kw, message):
    from rlhf_ops.config import ConfigError
    from rlhf_ops.trainers.dpo import DPOConfig

    with pytest.raises(ConfigError, match=message):
        DPOConfig(pretrain="tiny-model", dataset="d", **kw)


# ------------------------------------------------------------------------------ slow: real runs


def score_pairs(model, data, pad_id):
    """Our rewards (chosen_N, rejected_N) of every pair, padded micro-batches of 16 pairs."""
    from rlhf_ops.data.preference import pair_batch, split_pairs
    from rlhf_ops.models.reward import sequence_rewards, token_values

    out = []
    with torch.no_grad():
        for i in range(0, len(data), 16):
            pb = pair_batch(data, list(range(i, min(i + 16, len(data)))), pad_id, packed=False, device="cpu")
            out.append(torch.stack(split_pairs(sequence_rewards(token_values(model, pb.batch), pb.batch), pb.num_pairs)))
    return torch.cat(out, dim=1)


@pytest.mark.slow
def test_rm_beats_chance_on_held_out_pairs_and_hf_sequence_classification_scores_identically(
        pref_opts, tiny_model_dir, tmp_path, builtin_data_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_ops.config import parse_config
    from rlhf_ops.data.batching import collate
    from rlhf_ops.data.preference import build_preference_set
    from rlhf_ops.models.reward import load_value_model
    from rlhf_ops.trainers.rm import RMConfig

    # the tiny preset's RM params from the default-size tiny model: 2000 pairs, 62 steps (about 45 s)
    opts = {**pref_opts, "pretrain": tiny_model_dir, "eval_dataset": builtin_data_dir / "preference",
            "train_batch_size": 32, "micro_train_batch_size": 16, "max_epochs": 1, "learning_rate": 1e-3,
            "lr_warmup_ratio": 0.05, "logging_steps": 20, "eval_steps": 1000,
            "save_path": tmp_path / "rm", "ckpt_path": tmp_path / "ckpt"}
    run([sys.executable, "-m", "rlhf_ops.cli.train_rm", *argv(opts)])
    final = metrics(tmp_path / "rm" / "metrics.jsonl", "eval")[-1]
    # 200 held-out pairs: one standard error of an accuracy near 0.5 is 0.035; measured 0.695
    assert final["step"] == 62 and final["acc"] >= 0.62 and final["margin"] > 0.5, final
    assert metrics(tmp_path / "rm" / "metrics.jsonl", "train")[0]["acc"] < 0.62

    path = str(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    assert hf.config.normalize_reward is False
    assert (hf.config.mean, hf.config.std) == pytest.approx((final["reward_mean"], final["reward_std"]), rel=1e-6)
    tok = AutoTokenizer.from_pretrained(path)
    ours = load_value_model(path, pad_token_id=tok.pad_token_id).eval()
    cfg = parse_config(RMConfig, argv({**pref_opts, "pretrain": path}))
    held_out = build_preference_set(cfg, tok, str(builtin_data_dir / "preference"), "eval")
    rewards = score_pairs(ours, held_out, tok.pad_token_id)  # [2, N]
    right = (rewards[0] > rewards[1]).tolist()
    assert sum(right) / len(right) == pytest.approx(final["acc"], abs=1e-9)
    kinds = [json.loads(line)["error"] for line in
             (builtin_data_dir / "preference" / "eval.jsonl").read_text().splitlines()]
    by_kind = {k: sum(r for r, e in zip(right, kinds) if e == k) / kinds.count(k) for k in sorted(set(kinds))}
    print("RM held-out accuracy by error kind:", {k: round(v, 3) for k, v in by_kind.items()})
    assert by_kind["truncated"] >= 0.9, by_kind
    # HF's forward on right-padded ids of varying lengths, pooled at the last non-pad token
    ids = held_out.chosen_ids[:8] + held_out.rejected_ids[:8]
    batch = collate(ids, [[1] * len(x) for x in ids], tok.pad_token_id)
    assert len(set(batch.seq_lens)) > 2
    with torch.no_grad():
        theirs = hf(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, torch.cat([rewards[0, :8], rewards[1, :8]]), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_rm_prefix_sharing_trains_to_the_same_weights(pref_opts, model_dir, tmp_path):
    """--prefix_sharing carries each pair's common prefix once; the rewards, loss and gradients do not change."""
    from safetensors.torch import load_file

    for name, extra in (("plain", {}), ("shared", {"prefix_sharing": True})):
        opts = {**pref_opts, "max_samples": 96, "train_batch_size": 32, "micro_train_batch_size": 16, "max_epochs": 1,
                "learning_rate": 1e-3, "logging_steps": 1, "eval_steps": -1, "save_path": tmp_path / name,
                "ckpt_path": tmp_path / f"{name}_ckpt", **extra}
        run([sys.executable, "-m", "rlhf_ops.cli.train_rm", *argv(opts)])
    plain, shared = (load_file(str(tmp_path / n / "model.safetensors")) for n in ("plain", "shared"))
    assert plain.keys() == shared.keys()
    for k in plain:  # three Adam steps of lr 1e-3 each; fp32 summation order differs
        torch.testing.assert_close(shared[k], plain[k], rtol=0, atol=1e-5, msg=k)
    rows = {n: metrics(tmp_path / n / "metrics.jsonl", "train") for n in ("plain", "shared")}
    assert len(rows["shared"]) == 3
    for a, b in zip(rows["plain"], rows["shared"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["acc"] == b["acc"]


@pytest.mark.slow
def test_lora_rm_saves_an_adapter_with_the_head_and_reward_stats(pref_opts, model_dir, tmp_path):
    from peft import PeftModel
    from safetensors import safe_open

    from rlhf_ops.config import parse_config
    from rlhf_ops.data.preference import build_preference_set
    from rlhf_ops.models.loading import load_tokenizer
    from rlhf_ops.models.reward import load_value_model
    from rlhf_ops.trainers.rm import RMConfig

    opts = {**pref_opts, "max_samples": 64, "train_batch_size": 16, "micro_train_batch_size": 8, "learning_rate": 1e-2,
            "lora_rank": 4, "lora_alpha": 8, "save_path": tmp_path / "rm", "ckpt_path": tmp_path / "ckpt"}
    run([sys.executable, "-m", "rlhf_ops.cli.train_rm", *argv(opts)])
    out = tmp_path / "rm"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("score.weight") for k in keys) and all("lora_" in k or "score" in k for k in keys)
    final = metrics(out / "metrics.jsonl", "eval")[-1]  # no --eval_dataset: the first 64 training pairs
    config = json.loads((out / "config.json").read_text())
    assert (config["mean"], config["std"]) == pytest.approx((final["reward_mean"], final["reward_std"]), rel=1e-6)
    # base + adapter reproduces the trained rewards, head included
    tok = load_tokenizer(str(out))
    model = PeftModel.from_pretrained(load_value_model(str(model_dir), pad_token_id=tok.pad_token_id), str(out)).eval()
    cfg = parse_config(RMConfig, argv({k: v for k, v in opts.items() if k not in ("lora_rank", "lora_alpha")}))
    data = build_preference_set(cfg, tok, cfg.dataset, "train", max_samples=64)
    assert score_pairs(model, data, tok.pad_token_id).mean().item() == pytest.approx(final["reward_mean"], abs=1e-5)


DPO_DRIVER = """
import json, sys
import rlhf_ops.trainers.dpo as dpo
count = [0]
load = dpo.load_reference
def counted(cfg, device):
    model = load(cfg, device)
    model.register_forward_pre_hook(lambda *args: count.__setitem__(0, count[0] + 1))
    return model
dpo.load_reference = counted
from rlhf_ops.cli.train_dpo import main
main(sys.argv[1:])
print("REFERENCE_FORWARDS", count[0])
"""


@pytest.mark.slow
def test_dpo_raises_the_eval_margin_and_scores_the_reference_once(pref_opts, first_pairs, tmp_path):
    # 64 pairs x 10 epochs, 16 per step: 40 steps, evaluated on those pairs. Held-out margins are noise at
    # this scale (-0.0025, acc 0.47, on the 200 eval pairs after 40 steps of 32 pairs at lr 1e-3).
    opts = {**pref_opts, "dataset": first_pairs, "eval_dataset": first_pairs, "max_epochs": 10,
            "train_batch_size": 16, "micro_train_batch_size": 8, "learning_rate": 3e-3, "beta": 0.1,
            "logging_steps": 10, "eval_steps": 20, "save_path": tmp_path / "dpo", "ckpt_path": tmp_path / "ckpt"}
    log = run([sys.executable, "-c", DPO_DRIVER, *argv(opts)])
    forwards = int(log.rsplit("REFERENCE_FORWARDS", 1)[1].split()[0])
    assert forwards == 64 // 8 + 64 // 8  # train + eval pairs once each, while 80 policy micro-steps ran
    evals = metrics(tmp_path / "dpo" / "metrics.jsonl", "eval")
    assert [r["step"] for r in evals] == [20, 40]
    # before training the policy is the reference: margin 0 (test_dpo_starts_at_zero_margin_...)
    assert 0.2 < evals[0]["margin"] < evals[1]["margin"] and evals[1]["acc"] > 0.7, evals  # measured 0.49, 0.89; 0.81
    train = metrics(tmp_path / "dpo" / "metrics.jsonl", "train")
    assert train[-1]["margin"] > train[0]["margin"], train

    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "dpo"))


@pytest.mark.slow
def test_reference_rm_command_runs_under_the_deepspeed_launcher(model_dir, builtin_data_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm_ref"
    # The reference command with --pretrain/--dataset swapped for the tiny local ones and --flash_attn /
    # --use_wandb dropped. Additions: `--master_port` for the launcher (its default 29500 clashes with other
    # runs), and a trailing `--max_samples 512`: bf16 is ~10x slower than fp32 on a CPU; 512 pairs are 2
    # optimizer steps of 64 micro-batches.
    cmd = [str(BIN / "deepspeed"), "--master_port", str(free_port()), "--module", "rlhf_ops.cli.train_rm",
           "--save_path", str(out), "--save_steps", "-1", "--logging_steps", "1", "--eval_steps", "-1",
           "--train_batch_size", "256", "--micro_train_batch_size", "4", "--pretrain", str(model_dir), "--bf16",
           "--max_epochs", "1", "--max_len", "8192", "--zero_stage", "3", "--learning_rate", "9e-6",
           "--dataset", str(builtin_data_dir / "preference_chat"), "--apply_chat_template", "--chosen_key", "chosen",
           "--rejected_key", "rejected", "--packing_samples", "--gradient_checkpointing",
           "--max_samples", "512"]
    run(cmd, cwd=tmp_path, timeout=480)
    model = AutoModelForSequenceClassification.from_pretrained(str(out), num_labels=1)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert math.isfinite(model.config.mean) and model.config.std > 0
    train = metrics(out / "metrics.jsonl", "train")
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
