"""shadow: FP8 pretraining guarded by exact BF16 replays."""

__version__ = "0.1.0"
