"""CPU speed pieces: oneDNN products, the fused LM-head passes, fused gated MLPs, the inverse-CDF sampler and
glibc's mmap threshold. Each computes what a plain path computes; tests hold them equal."""
