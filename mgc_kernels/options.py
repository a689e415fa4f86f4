"""The option names the ops accept, in one neutral place that ops, reference, Triton and losses
all read: region-overlap metrics and the pair-sampling rules."""

METRICS = ("mgc", "iou", "ioa")
"""``|a ∩ b| / (|a| + |b|)`` (MGC's weight), intersection over union, intersection over ``|a|``."""

SAMPLE_METHODS = ("mgc", "topk", "all")
"""The official stride + top-k rule, plain top-k, and every overlapping pair."""
