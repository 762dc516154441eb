"""Scale: weight-only int8 (quantize) and tensor parallelism over torch.distributed (parallel), built on the core
(bloom/config.py, model.py, kv_cache.py, memory.py, matvec.py) and used by the checkpoint loader as it reads."""
