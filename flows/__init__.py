"""Prefect flows over `rlhf_ops` (see flows/rlhf.py). Importing this package turns telemetry off by
default (Prefect analytics, Ray usage stats, DVC analytics, Hugging Face telemetry, W&B offline)
before Prefect or Ray is imported; a user who sets one of these variables keeps their value."""
import os

PRIVACY_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a fresh PREFECT_HOME can take > 20 s
    "RAY_USAGE_STATS_ENABLED": "0",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "offline",
}
for _k, _v in PRIVACY_DEFAULTS.items():
    os.environ.setdefault(_k, _v)
