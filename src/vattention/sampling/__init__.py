"""vattention.sampling: choose each sequence's next token from the model's logits.

Data flow, once per engine step (the model runner owns the call, the sampler holds no state):

    model runner ──(logits [num_rows, vocab], SamplingBatch)──► Sampler ──► SamplerOutput
                     on CPU or CUDA; per-row params, token         host lists: token ids and,
                     history and seeded generators                 when asked, logprobs

`Sampler` applies penalties and logit bias, then greedy argmax or temperature / top-k / top-p / min-p and a draw;
`apply_penalties`, `apply_logit_bias`, `sampling_probs` and `draw` are its stages, usable alone (tests, speculative
decoding). Depends only on torch and `vattention.sampling_params`.
"""

from .sampler import (GREEDY_TEMPERATURE, DeviceSample, HostCopy, Sampler, SamplerOutput, SamplingBatch, apply_logit_bias,
                      apply_penalties, draw, sampling_probs)

__all__ = ["Sampler", "SamplingBatch", "SamplerOutput", "DeviceSample", "HostCopy", "apply_penalties", "apply_logit_bias",
           "sampling_probs", "draw", "GREEDY_TEMPERATURE"]
