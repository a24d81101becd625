"""rlhf_ops: the ML library of the pipeline (data, models, algorithms, trainers, CLIs)."""
__version__ = "0.1.0"
