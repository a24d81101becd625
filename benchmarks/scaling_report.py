"""Report half of `benchmarks/scaling.py`: scaling.md and the two PNG plots from a result dict (the text
in `scaling_findings.py`, the plots in `scaling_plots.py`, shared numbers in `scaling_common.py`).

Split from the measuring script so each stays readable; `scaling.py --replot scaling.json` calls
`report` alone. Nothing here measures or runs anything.
"""
from __future__ import annotations

from pathlib import Path

from scaling_common import BASE_MICRO, SWEEP_X, exponent, exponent_err, fmt  # (benchmarks/ is on sys.path)
from scaling_findings import mechanisms, noise, rl_findings, rl_summary, zero_findings
from scaling_plots import plots


def rl_tables(rows: list[dict]) -> tuple[list[str], list[str]]:
    md = ["| sweep | policy | hidden | params | max len | samples/prompt | samples/step | micro rollout | mean resp. "
          "tokens | packed | step s | step s min-max | generate s | score s | logprobs s | train s | other s | "
          "ms per sample-token | peak RSS MB | load before/after |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['sweep']} | {r['policy']} | {r['hidden']} | {r['params']:,} | {r['gen_len']} | {r['n_samples']} | "
                  f"{r['samples_per_step']} | {r.get('micro_rollout', BASE_MICRO)} | {r['response_length']:.1f} | "
                  f"{'yes' if r.get('packing') else 'no'} | "
                  f"**{r['step_s']:.2f}** | {fmt(r.get('step_s_min'))}-{fmt(r.get('step_s_max'))} | {r['generate_s']:.2f} | "
                  f"{r['score_s']:.3f} | {r['logprobs_s']:.2f} | {r['train_s']:.2f} | {r['other_s']:.2f} | "
                  f"{r['ms_per_token']:.3f} | {fmt(r['peak_rss_mb'], 0)} | "
                  f"{fmt(r.get('loadavg_1m_before'))}/{fmt(r.get('loadavg_1m_after'))} |")
    ex = ["| sweep | from -> to | x ratio | step | generate | logprobs | train |", "|---|---|---|---|---|---|---|"]
    for sweep in dict.fromkeys(r["sweep"] for r in rows):
        key, _ = SWEEP_X[sweep]
        pts = sorted((r for r in rows if r["sweep"] == sweep), key=lambda r: r[key])
        for p0, p1 in zip(pts, pts[1:]):
            label = {"response_length": lambda r: f"{r['response_length']:.0f} tok (max {r['gen_len']})",
                     "n_samples": lambda r: f"n={r['n_samples']}",
                     "params": lambda r: f"h{r['hidden']} ({r['params'] / 1e6:.2f}M)",
                     "micro_rollout": lambda r: f"micro {r['micro_rollout']}"}[key]
            cs = ("step_s", "generate_s", "logprobs_s", "train_s")
            es = [exponent(p0[key], p1[key], p0[c], p1[c]) for c in cs]
            errs = [exponent_err(key, p0, p1, c) for c in cs]
            ex.append(f"| {sweep} | {label(p0)} -> {label(p1)} | {p1[key] / p0[key]:.2f} | " +
                      " | ".join("-" if e is None else f"{e:.2f} ± {d:.2f}" for e, d in zip(es, errs)) + " |")
    return md, ex


def zero_table(baseline: dict, rows: list[dict]) -> list[str]:
    md = ["| model | params | ZeRO | peak RSS rank 0 MB | rank 1 MB | mean MB | vs ZeRO 0 MB | "
          "model states per rank MB (textbook) | saved vs ZeRO 0 (textbook) MB | train s/step |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        z0 = next((x for x in rows if x["hidden"] == r["hidden"] and x["zero_stage"] == 0), None)
        d = r["peak_rss_mb_mean"] - z0["peak_rss_mb_mean"] if z0 else None
        saved = z0["model_state_mb_per_rank"] - r["model_state_mb_per_rank"] if z0 else None
        per = r["peak_rss_mb_per_rank"] + [None] * (2 - len(r["peak_rss_mb_per_rank"]))
        md.append(f"| h{r['hidden']} | {r['params']:,} | {r['zero_stage']} | {fmt(per[0], 0)} | {fmt(per[1], 0)} | "
                  f"{r['peak_rss_mb_mean']:.0f} | {'+' if d is not None and d >= 0 else ''}{fmt(d, 0)} | "
                  f"{r['model_state_mb_per_rank']:.1f} | {fmt(saved, 1)} | {fmt(r['train_s_per_step'])} |")
    md.append(f"| imports only (torch, transformers, deepspeed, rlhf_ops) | - | - | {baseline['VmHWM_kb'] / 1024:.0f} "
              f"| - | - | - | - | - | - |")
    zc = baseline["with_zero_check_imports"]["VmHWM_kb"] / 1024
    md.append(f"| imports only + `deepspeed.runtime.zero.muon.muon_optimizer` (imported by the ZeRO >= 1 optimizer "
              f"check; loads the torch.compile stack) | - | - | {zc:.0f} | - | - | - | - | - | - |")
    return md


def report(r: dict, out: Path) -> None:
    """scaling.md and the two plots from a result dict (also `--replot scaling.json`)."""
    rl, baseline, zero = r["rl"], r["zero_baseline_imports"], r["zero"]
    la = lambda x: "/".join(f"{v:.2f}" for v in x)  # noqa: E731
    header = (f"{r['date']} -> {r['end']} ({r['seconds']:.0f} s); machine: {r['machine']}, {r['cores']} cores, no GPU; "
              f"OMP_NUM_THREADS={r['omp_num_threads']}; load average (1/5/15 min) at start {la(r['loadavg_start'])}, "
              f"at end {la(r['loadavg_end'])}"
              + (f" (waited for 1-min load < {r['load_wait_threshold']}: readings every 30 s {r['load_wait_readings']})"
                 if r["load_wait_readings"] else "")
              + f".\n\nCommand: `{r['command'].strip()}`\n\nCode: git {r.get('git_head', '?')}; hash of rlhf_ops/**/*.py "
              f"and params/presets/tiny/*.yaml {r.get('code_hash_start', '?')} at start, {r.get('code_hash_end', '?')} at end"
              + (" (**changed during the run: numbers may mix two versions**)"
                 if r.get("code_hash_start") != r.get("code_hash_end") else " (unchanged)")
              + ". The preset YAMLs were copied at the start and every run used the copies.\n")
    md = ["# Scaling benchmark", "", header]
    steps = r["steps_per_point"]
    pre = r["preset_rl"]
    if rl:
        t, ex = rl_tables(rl)
        md += ["## 1. Time per RL step (GRPO, `rlhf_ops.cli.train_ppo`)", "",
               f"Settings: params/presets/tiny/rl.yaml ({pre['advantage_estimator']}, KL loss {pre.get('use_kl_loss')} "
               f"({pre.get('kl_estimator')}), {pre['rollout_batch_size']} prompts per step, train batch "
               f"{pre['train_batch_size']}, micro {pre['micro_train_batch_size']}, micro rollout "
               f"{pre['micro_rollout_batch_size']}, packing_samples {str(bool(pre.get('packing_samples'))).lower()}, "
               f"fp32, ZeRO {pre.get('zero_stage', 0)}, one process), reward "
               f"rlhf_ops/rewards/arith.py, no eval. {steps} steps per point, the first dropped as warm-up; "
               f"columns are the mean over the other {steps - 1} step(s). Policies: *untrained* tiny Llama "
               f"models from `make_tiny` (4 layers, 4 heads, 2 KV heads, intermediate 4 x hidden, vocab 512): "
               f"their step time is what a trained model of the same shape would cost for the same lengths, "
               f"and they rarely emit EOS, so responses run close to --generate_max_len. An untrained policy "
               f"scores ~0 on the arithmetic reward, so its group advantages are ~0, but the update does the same "
               f"forward/backward (policy + k3 KL loss) and optimizer work whatever the advantages (nothing in "
               f"rlhf_ops/rl/update.py skips on zero advantages). "
               + ("The `sft` rows use the trained SFT model (" + r["sft_model"] + "), whose answers stop at EOS. "
                  if r["sft_model"] else "")
               + "logprobs = `time_logprobs`, all of `make_experience` (actor and reference forwards, KL, "
               "advantages); other = step time outside the four parts (NaN checks, weight sync, bookkeeping). "
               "ms per sample-token = step time / (samples x mean response tokens).", ""] + t + [
               "", "Local scaling exponents k (time ~ x^k between neighbouring points; x is mean response "
               "tokens, samples per prompt or parameters; 1 = linear, 2 = quadratic). Noise: single steps vary by "
               f"up to {noise(rl):.0f}% around their point's mean (column step s min-max); a mean of "
               f"{steps - 1} steps is correspondingly less noisy, but a 10% error in one time moves k by "
               "log(1.1)/log(x ratio): 0.14 over a doubling, 0.36 over x1.3, so exponents over small x ratios "
               "are rough:", ""] + ex + [
               "", "Summary (step time, first to last point of each sweep; the ± is from the step-to-step spread within "
               "the two points and understates run-to-run drift, see the last item under Measured):", ""] + rl_summary(rl) + [
               "", "Measured (classes: k < 0.2 flat, < 0.8 sublinear, 0.8-1.2 linear, 1.2-1.8 between linear and "
               "quadratic, above: quadratic or worse):", ""] + rl_findings(rl, pre) + ["", mechanisms(pre)]
    if zero:
        P0 = {z["hidden"]: z["params"] for z in zero}
        md += ["## 2. Peak memory per ZeRO stage (`rlhf_ops.cli.train_sft`, 2 processes)", "",
               f"`torchrun --standalone --nproc_per_node 2` (as tests/integration does), gloo, fp32, "
               f"params/presets/tiny/sft.yaml with train batch 16, micro 8 (no accumulation), max_len 128, "
               f"{r['zero_steps']} optimizer steps, final model saved. Peak RSS = VmHWM of each rank process "
               f"(read from /proc/self/status by a runpy wrapper when the CLI returns; ru_maxrss agrees, see JSON). "
               f"Model states (textbook) = per rank, fp32 weights 4 B + grads 4 B + Adam 8 B per parameter, "
               f"with ZeRO-1 sharding the Adam state, ZeRO-2 also the grads, ZeRO-3 also the weights over 2 ranks.",
               ""] + zero_table(baseline, zero) + [""] + zero_findings(baseline, zero, P0)
    text = "\n".join(md) + "\n"
    print(text)
    (out / "scaling.md").write_text(text)
    plots(out, rl, baseline, zero)
    print(f"wrote {out / 'scaling.md'}, {out / 'scaling_rl_step.png'}, {out / 'scaling_zero_memory.png'}")
