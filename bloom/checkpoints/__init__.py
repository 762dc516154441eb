"""Checkpoints: the published files as they are on the hub (loader), a local folder or the hub's cache (hub), and
the tokenizer (tokenizer), on top of the core and scale."""
