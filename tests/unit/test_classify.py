"""Label log-likelihoods: equal to scoring each full answer on its own, batched or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneforge.data.chat import ChatEncoder
from tuneforge.scoring import label_logprobs, probabilities


@pytest.mark.parametrize("labels", [["positive", "negative"], ["neg", "negative", "neutral", "positive"]])
def test_label_scores_match_single_sequence_log_likelihood(tiny_llama, tiny_tokenizer, labels):
    """All labels of a prompt share one forward pass (a tree mask); each must score as if it ran alone,
    also when labels begin with the same tokens."""
    encoder = ChatEncoder(tiny_tokenizer)
    prompts = [
        [{"role": "user", "content": "Classify: great"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Classify: awful thing"}],
        [{"role": "user", "content": "Classify: a much longer review that pads the others in its batch " * 2}],
    ]
    batched = label_logprobs(tiny_llama, encoder, prompts, labels, batch_size=3)
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            e = encoder.encode(prompt + [{"role": "assistant", "content": label}])
            ids = torch.tensor([e.input_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(tiny_llama(input_ids=ids).logits[0, :-1], -1)
            expected = sum(
                logprobs[t - 1, e.input_ids[t]].item() for t in range(1, len(e.input_ids)) if e.supervised[t]
            )
            assert abs(batched[i, j] - expected) < 1e-4
    p = probabilities(batched)
    assert np.allclose(p.sum(axis=1), 1.0) and (p > 0).all()
