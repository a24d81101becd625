"""Write the built-in arithmetic task (rlhf_ops.data.arith) as every dataset the pipeline needs.

One call writes SFT (plain, chat, multi-turn), preference (plain, chat), PRM (Math-Shepherd
layout) and RL prompt (plain, chat) JSONL files plus a manifest.json with row counts and sha256
sums; docs/data_layout.md describes each file. Why it is built this way:

* deterministic: the same (preset, seed) gives byte-identical files, so DVC caches them;
* disjoint: one stream of distinct problems is cut into an eval block (shared by every eval
  file) and one train block per dataset, so no eval question is ever trained on;
* atomic: files go to a temporary directory next to the target, which is renamed into place
  (rlhf_ops.utils.atomic.atomic_dir); a directory that holds anything other than an earlier
  output (found by its manifest.json) is never overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterable, Literal

from rlhf_ops.data.arith import (CORRUPTIONS, Problem, corrupt_solution, format_solution, make_problems,
                                 truncate_solution)
from rlhf_ops.utils.atomic import atomic_dir

TASK = "arith"
INPUT_TEMPLATE = "User: {}\nAssistant: "
PRM_PLACEHOLDER = "ки"  # Cyrillic "ki", the step tag of Math-Shepherd
PresetName = Literal["tiny", "small"]
# rows per dataset: (train, eval); "small" is 10x "tiny"
PRESETS: dict[str, dict[str, tuple[int, int]]] = {
    "tiny": {"sft": (4000, 200), "preference": (2000, 200), "prm": (2000, 200), "prompts": (1000, 200)},
}
PRESETS["small"] = {k: (tr * 10, ev * 10) for k, (tr, ev) in PRESETS["tiny"].items()}
SPLITS = ("train", "eval")
REJECTED_KINDS = (*CORRUPTIONS, "truncated")  # errors in the preference data's rejected answers
Rows = list[dict[str, Any]]


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def sft_rows(problems: list[Problem], noise: float = 0.0, rng: random.Random | None = None) -> tuple[Rows, Rows]:
    """(sft, sft_chat) rows: the question and its worked solution, as a demonstrator wrote it.

    With `noise` > 0 that share of demonstrations (drawn with `rng`) misreport the final answer:
    every step is right but the "Answer:" line states a nearby wrong number (`corrupt_solution`'s
    "answer" kind, the same slip the preference data rejects). Human demonstrations carry such
    slips; SFT imitates them, and RL against the verifier can unlearn them (README, RL section).
    """
    demos = []
    for p in problems:
        if noise > 0 and rng.random() < noise:
            steps, wrong, _ = corrupt_solution(p, rng, "answer")
            demos.append(format_solution(steps, wrong))
        else:
            demos.append(p.solution)
    plain = [{"input": p.question, "output": d} for p, d in zip(problems, demos)]
    chat = [{"messages": [_user(p.question), _assistant(d)]} for p, d in zip(problems, demos)]
    return plain, chat


def follow_up(value: int, rng: random.Random) -> tuple[str, str]:
    """A second-turn question about the previous answer and its one-step solution."""
    kinds = ["add"] + (["subtract"] if value >= 1 else []) + (["multiply"] if value <= 99 else [])
    kind = rng.choice(kinds)
    if kind == "multiply":
        k = rng.randint(2, 9)
        return f"Now multiply that by {k}.", format_solution([f"{value} * {k} = {value * k}"], str(value * k))
    if kind == "subtract":
        k = rng.randint(1, min(value, 99))
        return f"Now subtract {k} from that.", format_solution([f"{value} - {k} = {value - k}"], str(value - k))
    k = rng.randint(1, 99)
    return f"Now add {k} to that.", format_solution([f"{value} + {k} = {value + k}"], str(value + k))


def multiturn_rows(problems: list[Problem], rng: random.Random) -> Rows:
    """sft_multiturn rows: the problem, then a follow-up that builds on its answer."""
    rows = []
    for p in problems:
        question2, solution2 = follow_up(int(p.answer), rng)
        rows.append({"messages": [_user(p.question), _assistant(p.solution), _user(question2),
                                  _assistant(solution2)]})
    return rows


def preference_rows(problems: list[Problem], rng: random.Random) -> tuple[Rows, Rows]:
    """(preference, preference_chat) rows: the correct solution over a corrupted one.

    The rejected solution carries one error of a kind drawn uniformly from REJECTED_KINDS: the
    kinds of arith.CORRUPTIONS (arithmetic slip, miscopied operand, wrong "Answer:" line) or a
    solution truncated before its answer. `error` names the kind; margin = fraction of the
    rejected solution's lines (steps and the answer line) that are wrong or missing, so earlier
    mistakes make a wider preference gap.
    """
    plain, chat = [], []
    for p in problems:
        kind = rng.choice(REJECTED_KINDS)
        if kind == "truncated":
            rejected, bad = truncate_solution(p, rng)
        else:
            steps, answer, bad = corrupt_solution(p, rng, kind)
            rejected = format_solution(steps, answer)
        margin = round((len(p.steps) + 1 - bad) / (len(p.steps) + 1), 4)
        plain.append({"prompt": p.question, "chosen": p.solution, "rejected": rejected, "margin": margin,
                      "error": kind})
        chat.append({"chosen": [_user(p.question), _assistant(p.solution)],
                     "rejected": [_user(p.question), _assistant(rejected)]})
    return plain, chat


def prm_row(question: str, steps: list[str], answer: str, first_wrong: int | None) -> dict[str, Any]:
    """One Math-Shepherd row; the "Answer: N" line is the last step, every line from the first
    wrong one on is "-" (first_wrong=None: all "+")."""
    steps = [*steps, f"Answer: {answer}"]
    ok = [first_wrong is None or i < first_wrong for i in range(len(steps))]
    tagged = "\n".join(f"{s} {PRM_PLACEHOLDER}" for s in steps)
    labelled = "\n".join(f"{s} {'+' if good else '-'}" for s, good in zip(steps, ok))
    return {"input": f"{question}\n{tagged}", "label": f"{question}\n{labelled}",
            "value": [1.0 if good else 0.0 for good in ok]}


def prm_rows(problems: list[Problem], rng: random.Random) -> Rows:
    """PRM rows: about half the solutions are correct, the rest carry one propagated error of a
    kind drawn from arith.CORRUPTIONS."""
    rows = []
    for p in problems:
        if rng.random() < 0.5:
            rows.append(prm_row(p.question, p.steps, p.answer, None))
        else:
            rows.append(prm_row(p.question, *corrupt_solution(p, rng, rng.choice(CORRUPTIONS))))
    return rows


def prompt_rows(problems: list[Problem]) -> tuple[Rows, Rows]:
    """(prompts, prompts_chat) rows for RL: the question and the answer the reward checks."""
    plain = [{"input": p.question, "label": p.answer} for p in problems]
    chat = [{"context_messages": [_user(p.question)], "label": p.answer} for p in problems]
    return plain, chat


def _dataset_rows(kind: str, problems: list[Problem], rng: random.Random, sft_noise: float = 0.0,
                  noise_rng: random.Random | None = None) -> dict[str, Rows]:
    if kind == "sft":
        plain, chat = sft_rows(problems, sft_noise, noise_rng)
        return {"sft": plain, "sft_chat": chat, "sft_multiturn": multiturn_rows(problems, rng)}
    if kind == "preference":
        plain, chat = preference_rows(problems, rng)
        return {"preference": plain, "preference_chat": chat}
    if kind == "prm":
        return {"prm": prm_rows(problems, rng)}
    plain, chat = prompt_rows(problems)
    return {"prompts": plain, "prompts_chat": chat}


def rl_prompt_problems(n: int, seed: int, exclude: set[str]) -> list[Problem]:
    """`n` RL training problems from their own stream, none of them an `exclude`d (eval) question.

    Why a separate stream: the supervised train blocks are cut from one stream of distinct
    questions after the eval block, so by the time a fourth block is cut the small space of easy
    questions is used up (an RL block cut there held ~20% easy problems, and the tiny SFT model
    solved ~4% of its samples, too few for a learning signal). Drawn afresh, the RL prompts have
    the eval block's difficulty mix; they may repeat SFT training questions, as RL prompts
    commonly do, but never an eval one.
    """
    stream = make_problems(n + len(exclude), f"{seed}:prompts")
    return [p for p in stream if p.question not in exclude][:n]


def build_files(preset: str = "tiny", seed: int = 42, sft_noise: float = 0.0) -> dict[str, Rows]:
    """Every file of the layout as {relative path: rows}, without touching the disk.

    `sft_noise`: share of SFT train demonstrations with a misreported answer (`sft_rows`); the
    SFT eval split stays clean, so its loss measures against right solutions."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not 0.0 <= sft_noise < 1.0:
        raise ValueError(f"sft_noise must be in [0, 1), got {sft_noise}")
    sizes = PRESETS[preset]
    n_eval = max(ev for _, ev in sizes.values())
    supervised = [k for k in sizes if k != "prompts"]
    pool = make_problems(n_eval + sum(sizes[k][0] for k in supervised), seed)
    blocks = {"eval": {k: pool[:ev] for k, (_, ev) in sizes.items()}, "train": {}}
    start = n_eval
    for kind in supervised:
        blocks["train"][kind], start = pool[start:start + sizes[kind][0]], start + sizes[kind][0]
    blocks["train"]["prompts"] = rl_prompt_problems(sizes["prompts"][0], seed, {p.question for p in pool[:n_eval]})
    files: dict[str, Rows] = {}
    for kind in sizes:
        for split in SPLITS:
            rng = random.Random(f"{seed}:{kind}:{split}")
            noise = sft_noise if split == "train" else 0.0
            noise_rng = random.Random(f"{seed}:{kind}:{split}:noise")  # its own stream: noise 0 changes nothing else
            for name, rows in _dataset_rows(kind, blocks[split][kind], rng, noise, noise_rng).items():
                files[f"{name}/{split}.jsonl"] = rows
    return dict(sorted(files.items()))


def _jsonl_bytes(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def _write_tree(root: Path, files: dict[str, Rows], preset: str, seed: int, sft_noise: float) -> dict[str, Any]:
    entries = {}
    for rel, rows in files.items():
        data = _jsonl_bytes(rows)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        entries[rel] = {"rows": len(rows), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"preset": preset, "seed": seed, "sft_noise": sft_noise, "task": TASK, "files": entries,
                "input_template": INPUT_TEMPLATE, "prm_placeholder": PRM_PLACEHOLDER}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                        encoding="utf-8")
    return manifest


def is_prepare_output(path: Path) -> bool:
    """Whether `path` holds only an earlier write_dataset output (its manifest and files)."""
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
        ours = {"manifest.json", *(rel.split("/")[0] for rel in manifest["files"])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return {p.name for p in path.iterdir()} <= ours


def _target_state(out: Path) -> str:
    """'absent', 'empty' or 'previous' (which may all be replaced); raise FileExistsError otherwise."""
    if not out.exists():
        return "absent"
    if not out.is_dir():
        raise FileExistsError(f"output_dir {out} exists and is not a directory")
    if not any(out.iterdir()):
        return "empty"
    if is_prepare_output(out):
        return "previous"
    raise FileExistsError(
        f"output_dir {out} is not empty and is not an earlier `rlhf_ops.cli.prepare` output (no manifest.json "
        "listing its contents); refusing to overwrite it: choose another directory or remove this one")


def write_dataset(output_dir: str | os.PathLike, preset: str = "tiny", seed: int = 42,
                  sft_noise: float = 0.0) -> dict[str, Any]:
    """Write the whole layout under `output_dir` atomically; return the manifest."""
    out = Path(output_dir).absolute()
    _target_state(out)  # refuse before doing any work
    files = build_files(preset, seed, sft_noise)
    with atomic_dir(out) as tmp:
        manifest = _write_tree(tmp, files, preset, seed, sft_noise)
    return manifest
