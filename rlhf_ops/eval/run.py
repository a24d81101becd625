"""`evaluate(cfg)`: the evaluation stage end to end.

Models load one at a time in the order base, sft, rl; the SFT model stays loaded only while the
RL model still needs it as the KL reference. The reward model (win rate) loads last.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import shlex
import time
from typing import Any

import torch

from rlhf_ops.config import ConfigError
from rlhf_ops.eval.config import EvalConfig
from rlhf_ops.eval.policy import Responses, greedy_eval, kl_to_reference, load_policy, sampled_eval, win_rate
from rlhf_ops.eval.report import training_curves, write_outputs

logger = logging.getLogger(__name__)
PROG = "python -m rlhf_ops.cli.evaluate"


def shared_tokenizer(paths: dict[str, str], chat_template: str | None) -> Any:
    """The models' tokenizer; they must agree on the vocabulary (responses are compared token by token)."""
    from rlhf_ops.models.loading import load_tokenizer

    tok, first = None, None
    for name, path in paths.items():
        t = load_tokenizer(path, chat_template)
        if tok is None:
            tok, first, vocab = t, path, t.get_vocab()
        elif t.get_vocab() != vocab:
            raise ConfigError(f"--models: the tokenizers of {first} and {path} differ; models of one run share one")
    return tok


def command_line(cfg: EvalConfig) -> str:
    """The command that reproduces this evaluation (options left at their default are omitted)."""
    argv: list[str] = []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v == f.default:
            continue
        if isinstance(v, bool):
            argv.append(f"--{f.name}" if v else f"--no-{f.name}")
        else:
            argv += [f"--{f.name}", str(v)]
    return " ".join([PROG, *map(shlex.quote, argv)])


def evaluate(cfg: EvalConfig) -> dict:
    """Compute the metrics, write the outputs (atomically) and return metrics.json's content."""
    from rlhf_ops.models.reward import load_value_model
    from rlhf_ops.rl.rewards import ScoringOptions
    from rlhf_ops.rl.setup import build_prompts, make_scorer

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    paths = cfg.model_paths()
    tok = shared_tokenizer(paths, cfg.tokenizer_chat_template)
    prompts = build_prompts(cfg, tok, cfg.prompts, cfg.eval_split)  # EvalConfig carries RLConfig's prompt options
    score = make_scorer(ScoringOptions(cfg.reward_func, cfg.micro_batch_size), tok, None)
    metrics: dict[str, Any] = {"n_prompts": len(prompts)}
    greedy: dict[str, Responses] = {}
    rewards: dict[str, list[float]] = {}
    notes: list[str] = []
    ref = None
    for name, path in paths.items():
        t = time.perf_counter()
        model = load_policy(path, cfg.bf16)
        metrics[name], greedy[name], sc = greedy_eval(model, tok, prompts, score, cfg.generate_max_len,
                                                      cfg.micro_batch_size, name=f"{name} ({path})")
        rewards[name] = sc.rewards.tolist()
        if cfg.eval_n_samples_per_prompt:
            metrics[name].update(sampled_eval(model, tok, prompts, score, cfg.generate_max_len, cfg.micro_batch_size,
                                              cfg.eval_n_samples_per_prompt, cfg.eval_temperature, cfg.seed,
                                              name=f"{name} ({path})"))
        logger.info("%s: %s (%.1f s)", name, ", ".join(f"{k}={v:.4f}" for k, v in metrics[name].items()),
                    time.perf_counter() - t)
        if name == "sft" and "rl" in paths:
            ref = model  # the RL policy's KL reference
        elif name == "rl" and ref is not None:
            t = time.perf_counter()
            metrics["rl_kl_to_sft"] = kl_to_reference(model, ref, tok, prompts, cfg.generate_max_len,
                                                      cfg.micro_batch_size, cfg.seed)
            logger.info("KL(rl || sft): %s (%.1f s)", metrics["rl_kl_to_sft"], time.perf_counter() - t)
            ref = None
        del model
        gc.collect()
    if "rl_kl_to_sft" not in metrics:
        notes.append("KL(rl || sft) not computed: it needs both sft and rl in --models")

    rm_path, why = cfg.reward_model_path()
    if rm_path is None:
        notes.append(f"win rate not computed: {why}")
    elif not {"sft", "rl"} <= greedy.keys():
        notes.append("win rate not computed: it needs both sft and rl in --models")
    else:
        logger.info("win rate judged by %s (%s)", rm_path, why)
        rm = load_value_model(rm_path, value_head_prefix=cfg.value_head_prefix, bf16=cfg.bf16,
                              pad_token_id=tok.pad_token_id).eval()
        rm_score = make_scorer(ScoringOptions(None, cfg.micro_batch_size), tok, rm)
        metrics["rl_vs_sft_win_rate"] = win_rate(rm_score, prompts, greedy["rl"], greedy["sft"])
        notes.append(f"win rate judged by the reward model {rm_path}")
        del rm
    for n in notes:
        logger.info("%s", n)

    texts = {name: r.texts(tok) for name, r in greedy.items()}
    samples = [{"prompt": prompts.texts[i], "label": prompts.labels[i],
                "responses": {n: texts[n][i] for n in greedy}, "rewards": {n: rewards[n][i] for n in greedy}}
               for i in range(len(prompts))]
    report = write_outputs(cfg.out_dir, metrics, list(paths), training_curves(cfg.run_dir), samples,
                           command_line(cfg), notes)
    logger.info("evaluation done in %.1f s", time.perf_counter() - t0)
    print(f"evaluation report: {report}")
    return metrics
