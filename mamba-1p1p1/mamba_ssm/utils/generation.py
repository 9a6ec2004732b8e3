"""Decoding state passed to `Mamba.forward(..., inference_params=...)` (upstream's container)."""

from dataclasses import dataclass, field


@dataclass
class InferenceParams:
    """max_seqlen/max_batch_size size the caches; seqlen_offset > 0 means "decode one token";
    key_value_memory_dict maps layer_idx -> (conv_state, ssm_state)."""

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: object = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()
