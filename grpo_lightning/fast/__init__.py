"""Speed pieces: oneDNN products, the fused LM-head passes, fused gated MLPs and the inverse-CDF sampler, all
switched by ``model.fast`` (each computes what a plain path computes; tests hold them equal), and glibc's mmap
threshold, a process setting of the command line (``malloc_mmap_threshold``)."""
