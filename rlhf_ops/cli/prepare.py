"""`python -m rlhf_ops.cli.prepare`: write the built-in arithmetic datasets (the pipeline's first stage).

    python -m rlhf_ops.cli.prepare --output_dir data/tiny --preset tiny --seed 42

Writes SFT, preference, PRM and RL-prompt JSONL files plus manifest.json (layout in
docs/data_layout.md), deterministically and atomically, and prints one line per file.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

from rlhf_ops.config import check, opt, parse_config
from rlhf_ops.data.prepare import PRESETS, PresetName, write_dataset


@dataclass(frozen=True)
class PrepareConfig:
    """Write the built-in arithmetic task as SFT / preference / PRM / prompt datasets."""

    output_dir: str = opt(None, "Directory to write (created; replaced only if it is an earlier prepare output)",
                          required=True)
    preset: PresetName = opt("tiny", "Dataset sizes: " + "; ".join(
        f"{name}: sft {s['sft'][0]}/{s['sft'][1]} train/eval" for name, s in PRESETS.items()))
    seed: int = opt(42, "Random seed; the same preset and seed give byte-identical files")
    sft_noise: float = opt(0.0, "Share of SFT train demonstrations whose final answer is misreported (steps right, "
                                "'Answer:' wrong), as in human demonstrations; the eval split stays clean")

    def __post_init__(self) -> None:
        check(0.0 <= self.sft_noise < 1.0, "sft_noise", f"must be in [0, 1), got {self.sft_noise}")
        check(bool(self.output_dir and self.output_dir.strip()), "output_dir", "must not be empty")
        check(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}, got {self.preset!r}")


def summary(manifest: dict, output_dir: str) -> str:
    lines = [f"wrote {output_dir} (task {manifest['task']}, preset {manifest['preset']}, seed {manifest['seed']}, "
             f"SFT noise {manifest['sft_noise']})"]
    width = max(len(rel) for rel in manifest["files"])
    lines += [f"  {rel:<{width}}  {info['rows']:>6} rows" for rel, info in manifest["files"].items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the flags, write the datasets, print a summary; return the manifest."""
    cfg = parse_config(PrepareConfig, argv, prog="python -m rlhf_ops.cli.prepare")
    try:
        manifest = write_dataset(cfg.output_dir, preset=cfg.preset, seed=cfg.seed, sft_noise=cfg.sft_noise)
    except (FileExistsError, ValueError) as e:
        print(f"python -m rlhf_ops.cli.prepare: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    print(summary(manifest, cfg.output_dir))
    return manifest


if __name__ == "__main__":
    main()
