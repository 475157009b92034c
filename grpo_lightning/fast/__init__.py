"""The memory-safe LM head (:mod:`~grpo_lightning.fast.head_loss`), which the trainer runs on every device, and
the CPU speed pieces switched by ``model.fast``: oneDNN products, fused gated MLPs, the inverse-CDF sampler and
a rollout's buffers kept in the heap (each computes what a plain path computes; tests hold them equal); and
glibc's mmap threshold, an option of its own of the command line (``malloc_mmap_threshold``), and the command
line's request for transparent huge pages (:mod:`~grpo_lightning.fast.huge_pages`)."""
