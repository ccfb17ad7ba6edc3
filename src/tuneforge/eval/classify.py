"""Classification by likelihood: each label's log-probability as the assistant's answer.

A chat model asked to classify may answer "Positive!" or "The review is positive".
Scoring every label as the complete answer (its tokens plus the end-of-turn token)
with the same chat template as training gives a clean choice and a probability per
label, which accuracy, F1 and ROC-AUC need.
"""

from __future__ import annotations

import numpy as np
import torch


def label_logprobs(model, encoder, prompts: list[list[dict]], labels: list[str], batch_size: int = 8) -> np.ndarray:
    """[n_prompts, n_labels] summed log-probabilities of each label as the whole answer."""
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(labels))]
    encoded = encoder.encode_many([prompts[i] + [{"role": "assistant", "content": labels[j]}] for i, j in pairs])
    scores = np.zeros((len(prompts), len(labels)))
    device = next(model.parameters()).device
    pad = encoder.tokenizer.pad_token_id
    model.eval()
    for start in range(0, len(pairs), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[row, :n] = torch.tensor(e.input_ids)
            mask[row, :n] = 1
            target[row, :n] = torch.tensor(e.supervised)
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
        picked = logprobs.gather(-1, ids[:, 1:, None].to(device))[..., 0]
        picked = (picked * target[:, 1:].to(device)).sum(-1).cpu().numpy()
        for offset, value in enumerate(picked):
            i, j = pairs[start + offset]
            scores[i, j] = value
    return scores


def probabilities(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
