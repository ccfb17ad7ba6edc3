"""Likelihood of an answer given its prompt: label choice for classification, reference perplexity for generation.

A chat model asked to classify may answer "Positive!" or "The review is positive".
Scoring every label as the complete answer (its tokens plus the end-of-turn token)
with the same chat template as training gives a clean choice and a probability per
label, which accuracy, F1 and ROC-AUC need. The same teacher-forced scoring of a
reference answer gives its perplexity under each system.

Inputs longer than `max_length` never fail: the longest prompt message is shortened
first (ChatEncoder.fit, as prepare does), and if that is not enough the start of the
sequence is cut, so the end of the prompt and the whole answer are always scored.
"""

from __future__ import annotations

import numpy as np
import torch


def answer_logprobs(
    model, encoder, conversations: list[list[dict]], max_length: int | None = None, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each conversation's last assistant turn (with end-of-turn), and its token count."""
    encoded = [_last_turn_only(e) for e in _fitted(encoder, conversations, max_length)]
    sums, counts = np.zeros(len(encoded)), np.zeros(len(encoded), dtype=int)
    device = next(model.parameters()).device
    pad = encoder.tokenizer.pad_token_id
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))  # similar lengths share a batch
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        target = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, i in enumerate(chunk):
            tokens, supervised = encoded[i]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            target[row, : len(tokens)] = torch.tensor(supervised)
        # the logits at position t predict token t+1: only positions followed by an answer token are needed
        wanted = torch.zeros_like(target)
        wanted[:, :-1] = target[:, 1:]
        picked = _answer_token_logprobs(model, ids.to(device), mask.to(device), wanted.to(device))
        rows = wanted.nonzero()[:, 0].numpy()  # the row of each kept position, in the order they come out
        totals = np.bincount(rows, weights=picked.cpu().numpy(), minlength=len(chunk))
        for row, i in enumerate(chunk):
            sums[i], counts[i] = totals[row], int(wanted[row].sum())
    return sums, counts


def _answer_token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Log-probability of the next token at each `wanted` position, flattened row by row.

    Only those positions reach the vocabulary projection and the fp32 log-softmax: full logits of a batch of 8 x 1024
    tokens over a 128k vocabulary are 4 GB in fp32, where the answers' few hundred positions are a few hundred MB."""
    targets = torch.roll(ids, -1, dims=1)[wanted]
    with torch.no_grad():
        try:
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=wanted).logits
        except TypeError:  # a model without logits_to_keep: project everything, keep what is needed
            logits = model(input_ids=ids, attention_mask=mask).logits
        if logits.dim() == 3 and logits.shape[:2] == wanted.shape:  # the model ignored logits_to_keep
            logits = logits[wanted]
        logits = logits.reshape(-1, logits.shape[-1])
        return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None])[:, 0]


def label_logprobs(
    model,
    encoder,
    prompts: list[list[dict]],
    labels: list[str],
    batch_size: int = 8,
    max_length: int | None = None,
    return_counts: bool = False,
):
    """[n_prompts, n_labels] summed log-probabilities of each label as the whole answer (and, with return_counts,
    how many tokens each sum covers).

    Every label of one prompt is scored in a single forward pass: the prompt's tokens
    once, then each label's tokens as a branch that sees the prompt and itself only
    (a tree-shaped mask with positions continuing from the prompt). The same numbers
    as scoring prompt+label one by one, for one prompt's cost instead of one per label.
    FlashAttention-2 takes no such mask, so there each pair runs on its own.
    """
    if getattr(model.config, "_attn_implementation", None) == "flash_attention_2" or len(labels) == 1:
        pairs = [prompt + [{"role": "assistant", "content": label}] for prompt in prompts for label in labels]
        sums, counts = answer_logprobs(model, encoder, pairs, max_length, batch_size)
        shape = (len(prompts), len(labels))
        return (sums.reshape(shape), counts.reshape(shape)) if return_counts else sums.reshape(shape)
    trees = [_label_tree(encoder, prompt, labels, max_length) for prompt in prompts]
    out = np.zeros((len(prompts), len(labels)))
    counts = np.array([[len(targets) for _, targets in tree[3]] for tree in trees], dtype=int).reshape(
        len(prompts), len(labels)
    )
    device = next(model.parameters()).device
    dtype = getattr(model, "dtype", torch.float32)
    dtype = dtype if dtype.is_floating_point else torch.float32
    model.eval()
    order = sorted(range(len(trees)), key=lambda i: len(trees[i][0]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(trees[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), encoder.tokenizer.pad_token_id, dtype=torch.long)
        positions = torch.zeros((len(chunk), width), dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(
            len(chunk), 1, 1
        )  # padding sees itself: no empty softmax row
        for row, i in enumerate(chunk):
            tokens, pos, visible, _ = trees[i]
            n = len(tokens)
            ids[row, :n], positions[row, :n] = torch.tensor(tokens), torch.tensor(pos)
            allowed[row, :n, :n] = visible
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
        with torch.no_grad():
            logits = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device)
            ).logits
        for row, i in enumerate(chunk):
            for j, (predict_from, targets) in enumerate(trees[i][3]):
                picked = torch.log_softmax(logits[row, predict_from].float(), dim=-1).gather(
                    -1, torch.tensor(targets, device=device)[:, None]
                )
                out[i, j] = float(picked.sum())
    return (out, counts) if return_counts else out


def _label_tree(encoder, prompt: list[dict], labels: list[str], max_length: int | None):
    """Tokens, positions and visibility of the prompt followed by one branch per label, and per label
    (positions whose logits predict its answer tokens, those tokens)."""
    encoded = [
        _last_turn_only(e)
        for e in _fitted(encoder, [prompt + [{"role": "assistant", "content": label}] for label in labels], max_length)
    ]
    shared = 0
    first = encoded[0][0]
    while shared < len(first) and all(len(t) > shared and t[shared] == first[shared] for t, _ in encoded):
        shared += 1
    shared = min([shared] + [s.index(True) for _, s in encoded if True in s])  # labels may share their first tokens
    shared = max(shared, 1)
    tokens, positions, owner = list(first[:shared]), list(range(shared)), [-1] * shared
    branches = []
    for j, (ids, supervised) in enumerate(encoded):
        start = len(tokens)
        tail = ids[shared:]
        tokens += tail
        positions += range(shared, shared + len(tail))
        owner += [j] * len(tail)
        # the token at sequence index shared+t is predicted by the logits one position before it in its own branch
        predict_from = [start + t - 1 if t else shared - 1 for t in range(len(tail)) if supervised[shared + t]]
        branches.append((predict_from, [tail[t] for t in range(len(tail)) if supervised[shared + t]]))
    owner_t = torch.tensor(owner)
    index = torch.arange(len(tokens))
    same_branch = owner_t[:, None] == owner_t[None, :]
    visible = (owner_t[None, :] == -1) | same_branch
    visible &= index[None, :] <= index[:, None]
    return tokens, positions, visible, branches


def probabilities(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _fitted(encoder, conversations: list[list[dict]], max_length: int | None) -> list[tuple[list[int], list[bool]]]:
    out = []
    for messages, encoded in zip(conversations, encoder.encode_many(conversations)):
        if max_length is not None and len(encoded.input_ids) > max_length:
            encoded = encoder.encode(_shorten(encoder, messages, len(encoded.input_ids) - max_length, messages[:-1]))
            if len(encoded.input_ids) > max_length:  # the answer alone is long: keep the end
                encoded.input_ids, encoded.supervised = (
                    encoded.input_ids[-max_length:],
                    encoded.supervised[-max_length:],
                )
        out.append((encoded.input_ids, encoded.supervised))
    return out


def fit_prompt(encoder, messages: list[dict], max_length: int) -> list[dict]:
    """A prompt whose rendering (with the generation header) has at most max_length tokens, else the same prompt."""
    for _ in range(3):  # each round cuts the longest message left; three covers a long system and user turn
        length = len(
            encoder.tokenizer(encoder.render(messages, add_generation_prompt=True), add_special_tokens=False)[
                "input_ids"
            ]
        )
        if length <= max_length:
            break
        messages = _shorten(encoder, messages, length - max_length, messages)
    return messages


def _shorten(encoder, messages: list[dict], excess: int, among: list[dict]) -> list[dict]:
    """The messages with the longest of `among` cut by about `excess` tokens, its end kept (a question comes last)."""
    index = {id(m): i for i, m in enumerate(messages)}
    candidates = [m for m in among if isinstance(m.get("content"), str) and m.get("role") != "assistant"]
    messages = [dict(m) for m in messages]
    if not candidates:
        return messages
    longest = messages[index[id(max(candidates, key=lambda m: len(m["content"])))]]
    ids = encoder.tokenizer(longest["content"], add_special_tokens=False)["input_ids"]
    keep = max(len(ids) - excess - 4, 0)  # slack: re-tokenizing at the cut can shift by a token or two
    longest["content"] = "… " + encoder.tokenizer.decode(ids[len(ids) - keep :]).lstrip() if keep else "…"
    return messages


def _last_turn_only(pair: tuple[list[int], list[bool]]) -> tuple[list[int], list[bool]]:
    """Supervise only the final run of answer tokens (earlier assistant turns are context)."""
    tokens, supervised = pair
    end = len(supervised)
    while end and not supervised[end - 1]:
        end -= 1
    start = end
    while start and supervised[start - 1]:
        start -= 1
    return tokens, [start <= i < end for i in range(len(tokens))]
