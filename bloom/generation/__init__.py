"""Generation: the KV-cached decode step (decoder, and decode_step's one kernel call per block on the CPU), the
sampler (generate) and text streaming (streaming), on top of the core, scale and checkpoints."""
