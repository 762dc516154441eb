"""Generation: the KV-cached decode step (decoder, and decode_step's one kernel call for all blocks on the CPU), the
sampler (generate) and text streaming (streaming), on top of the core, scale and checkpoints."""
