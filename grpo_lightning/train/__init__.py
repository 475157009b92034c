"""Lightning glue: the module, its options, the reference, data, evaluation, callbacks, the command line,
several processes, mixed precision, the non-finite guard, checkpoints and preemption."""
