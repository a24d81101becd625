"""The evaluation stage (`python -m rlhf_ops.cli.evaluate`, run in process through `main(argv)`) on fake run dirs.

* sft and rl with identical weights: KL exactly 0, win rate exactly 0.5 (the run's rm/ found by default),
  identical sft and rl rows; every output file is there and well formed, nothing is written into the run dir;
* an rl with perturbed weights: KL > 0, and its accuracy/reward recomputed by hand (prompts formatted and
  tokenized here, greedy responses, the reward function called directly) match metrics.json;
* a missing model directory, or an --output_dir that is not an earlier evaluation's, exits with code 2 and
  a message naming the path, before anything is written.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from _helpers import save_test_reward_model, to_argv

TEMPLATE = "User: {}\nAssistant: "
FAST = {"max_samples": 16, "generate_max_len": 16}
# non-trivial rewards and an "accuracy" extra log for an untrained model, so the hand check compares real numbers
LENGTH_REWARD = ("def reward_func(queries, prompts, labels):\n"
                 "    r = [len(q) % 7 / 7.0 for q in queries]\n"
                 "    return {'rewards': r, 'extra_logs': {'accuracy': [float(len(q) % 2 == 0) for q in queries]}}\n")
SFT_ROWS = [{"step": s, "split": "train", "loss": 3.0 / s} for s in (1, 2, 3)] + [{"step": 3, "split": "eval", "loss": 1.5}]
RL_ROWS = ([{"step": 0, "split": "eval", "reward": 0.2, "accuracy": 0.1}]
           + [{"step": s, "split": "train", "reward": 0.1 * s, "kl": 0.01 * s, "accuracy": 0.05 * s} for s in (1, 2, 3, 4)]
           + [{"step": 4, "split": "eval", "reward": 0.3, "accuracy": 0.2}])


def _model_copy(src: Path, dst: Path, metrics: list[dict] | None = None) -> Path:
    """dst/ with symlinks to src's files (never writing into src), plus a metrics.jsonl."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        (dst / f.name).symlink_to(f.resolve())
    if metrics is not None:
        (dst / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics))
    return dst


def _make_run(root: Path, model: Path, data: Path, rl: Path | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "data").symlink_to(Path(data).resolve())
    _model_copy(model, root / "base_model")
    _model_copy(model, root / "sft", SFT_ROWS)
    _model_copy(rl or model, root / "rl", RL_ROWS)
    return root


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return save_test_reward_model(tiny_model_dir, tmp_path_factory.mktemp("eval_rm") / "rm")


@pytest.fixture(scope="module")
def perturbed_dir(tiny_model_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path_factory.mktemp("eval_perturbed") / "rl"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def evaluate(run: Path, out: Path, **kw) -> dict:
    from rlhf_ops.cli.evaluate import main
    metrics = main(to_argv({"run_dir": run, "output_dir": out, **FAST, **kw}))
    assert json.loads((out / "metrics.json").read_text()) == metrics
    return metrics


def _exit_code(argv: list[str], capsys) -> tuple[int, str]:
    from rlhf_ops.cli.evaluate import main
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.slow
def test_identical_policies_kl_zero_win_rate_half_and_outputs(tmp_path, tiny_model_dir, builtin_data_dir, rm_dir):
    run = _make_run(tmp_path / "run", tiny_model_dir, builtin_data_dir)
    _model_copy(rm_dir, run / "rm")  # found without --reward_pretrain
    before = _listing(run)
    out = tmp_path / "out"
    m = evaluate(run, out)

    assert m["n_prompts"] == 16
    assert set(m) == {"base", "sft", "rl", "rl_vs_sft_win_rate", "rl_kl_to_sft", "n_prompts"}
    for name in ("base", "sft", "rl"):
        assert set(m[name]) == {"accuracy", "verified", "reward", "response_length",
                                "sampled_accuracy", "sampled_verified", "sampled_reward"}
    assert m["sft"] == m["rl"] == m["base"]  # the same weights everywhere
    assert abs(m["rl_kl_to_sft"]["per_sequence"]) < 1e-9 and abs(m["rl_kl_to_sft"]["per_token"]) < 1e-9
    assert m["rl_vs_sft_win_rate"] == 0.5

    assert _listing(run) == before  # nothing written into the run directory
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "plots" / "sft_train.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "loss"] and len(rows) == 1 + 3 and float(rows[1][1]) == 3.0
    with (out / "plots" / "rl_train.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "reward", "accuracy", "kl"] and len(rows) == 1 + 4
    with (out / "plots" / "rl_eval.csv").open() as f:
        assert len(list(csv.reader(f))) == 1 + 2
    report = (out / "report.md").read_text()
    assert "| model | accuracy (greedy) | reward (greedy) | accuracy (sampled) |" in report
    assert "| rl |" in report and "win rate" in report
    assert f"--run_dir {run}" in report
    assert len((out / "samples.jsonl").read_text().splitlines()) == 16
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary dir left behind

    # a second run replaces the earlier output as a whole
    (out / "stale.txt").write_text("x")
    evaluate(run, out, models="sft", **{"no-win_rate": True})
    assert not (out / "stale.txt").exists()
    assert set(json.loads((out / "metrics.json").read_text())) == {"sft", "n_prompts"}
    assert "KL(rl || sft) not computed" in (out / "report.md").read_text()


@pytest.mark.slow
def test_perturbed_rl_kl_positive_and_scores_recomputed_by_hand(tmp_path, tiny_model_dir, builtin_data_dir,
                                                                perturbed_dir, rm_dir):
    from rlhf_ops.generation.base import HFGenerator, SamplingParams
    from rlhf_ops.models.loading import load_causal_lm, load_tokenizer
    from rlhf_ops.rl.rewards import load_reward_func

    run = _make_run(tmp_path / "run", tiny_model_dir, builtin_data_dir, rl=perturbed_dir)
    reward = tmp_path / "reward.py"
    reward.write_text(LENGTH_REWARD)
    out = tmp_path / "out"
    m = evaluate(run, out, models="sft,rl", reward_func=reward, reward_pretrain=rm_dir)
    assert set(m) == {"sft", "rl", "rl_vs_sft_win_rate", "rl_kl_to_sft", "n_prompts"}
    assert m["rl_kl_to_sft"]["per_sequence"] > 0 and m["rl_kl_to_sft"]["per_token"] > 0
    assert m["rl_kl_to_sft"]["per_sequence"] > m["rl_kl_to_sft"]["per_token"]  # responses are several tokens
    assert 0.0 <= m["rl_vs_sft_win_rate"] <= 1.0

    # by hand: read the eval split, format, tokenize, generate greedily, call the reward function directly
    rows = [json.loads(ln) for ln in (Path(builtin_data_dir) / "prompts" / "eval.jsonl").read_text().splitlines()][:16]
    tok = load_tokenizer(str(perturbed_dir))
    texts = [TEMPLATE.format(r["input"]) for r in rows]
    ids = [tok(t)["input_ids"] for t in texts]
    model = load_causal_lm(str(perturbed_dir)).eval()
    completions = HFGenerator(model, tok, 64).generate(ids, SamplingParams(0.0, 16))
    responses = [tok.decode(c, skip_special_tokens=True) for c in completions]
    got = load_reward_func(str(reward))([t + r for t, r in zip(texts, responses)], texts, [r["label"] for r in rows])
    acc = got["extra_logs"]["accuracy"]
    assert m["rl"]["accuracy"] == sum(acc) / len(acc)  # k/16: exact in float32
    assert m["rl"]["reward"] == pytest.approx(sum(got["rewards"]) / len(rows), rel=1e-6)
    assert 0 < m["rl"]["reward"]
    saved = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["responses"]["rl"] for s in saved] == responses
    assert m["rl"] != m["sft"]

    # the sampled figures by hand: 4 samples per prompt at temperature 1, seeded by --seed, prompt by prompt
    sampled = HFGenerator(model, tok, 64).generate([x for x in ids for _ in range(4)], SamplingParams(1.0, 16, 1.0, seed=42))
    texts4 = [t for t in texts for _ in range(4)]
    got = load_reward_func(str(reward))([t + tok.decode(c, skip_special_tokens=True) for t, c in zip(texts4, sampled)],
                                        texts4, [r["label"] for r in rows for _ in range(4)])
    assert m["rl"]["sampled_reward"] == pytest.approx(sum(got["rewards"]) / len(sampled), rel=1e-6)
    assert m["rl"]["sampled_accuracy"] == sum(got["extra_logs"]["accuracy"]) / len(sampled)
    assert m["rl"]["sampled_reward"] != m["rl"]["reward"]  # sampling really happened


def test_missing_model_dir_exits_2_naming_the_path(tmp_path, builtin_data_dir, capsys):
    run = tmp_path / "run"
    (run / "base_model").mkdir(parents=True)
    (run / "data").symlink_to(Path(builtin_data_dir).resolve())
    out = tmp_path / "out"
    code, err = _exit_code(to_argv({"run_dir": run, "output_dir": out, "models": "base,rl"}), capsys)
    assert code == 2 and os.path.join(str(run), "rl") in err and "does not exist" in err
    code, err = _exit_code(to_argv({"run_dir": run, "output_dir": out, "models": "base,ppo"}), capsys)
    assert code == 2 and "'ppo'" in err
    assert not out.exists()


def test_refuses_to_replace_a_directory_that_is_not_an_evaluation(tmp_path, tiny_model_dir, builtin_data_dir, capsys):
    run = _make_run(tmp_path / "run", tiny_model_dir, builtin_data_dir)
    code, err = _exit_code(to_argv({"run_dir": run, "output_dir": run / "sft", "models": "base"}), capsys)
    assert code == 2 and "not an evaluation's output" in err
    code, err = _exit_code(to_argv({"run_dir": run, "output_dir": tmp_path, "models": "base"}), capsys)
    assert code == 2 and "contains the run directory" in err
    assert (run / "sft" / "metrics.jsonl").is_file()
