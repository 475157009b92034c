"""Side-by-side GRPO benchmarks: grpo-lightning against TRL's GRPOTrainer (not part of the installed package)."""
