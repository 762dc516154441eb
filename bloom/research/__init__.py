"""Research tools: named activations read or replaced (probe) and what is built on them (lens, weights,
attribution, patching, head scores, activations), perplexity, lm-evaluation-harness (evaluation) and pictures
(viz, page).
New tools go here, beside probe.py, and never into the model."""
