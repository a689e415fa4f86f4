"""The option names the ops accept, in one neutral place that ops, reference, Triton and losses
all read: region-overlap metrics, the pair-sampling rules and the loss reductions."""

METRICS = ("mgc", "iou", "ioa")
"""``|a ∩ b| / (|a| + |b|)`` (MGC's weight), intersection over union, intersection over ``|a|``."""

SAMPLE_METHODS = ("mgc", "topk", "all")
"""The official stride + top-k rule, plain top-k, and every overlapping pair."""

REDUCTIONS = ("mean", "sum", "none")
"""Per-row losses reduced to their (weighted) mean or sum, or returned as they are."""
