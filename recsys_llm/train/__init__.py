"""Sharding (planner + DMP), pipelined train/eval loops, metrics, checkpoints."""
