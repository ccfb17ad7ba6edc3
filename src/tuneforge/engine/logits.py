"""What a request may do to each step's logits, row by row in a batch: report them (`logprobs`), shift them
(`logit_bias`), and hold the answer to a JSON grammar (`response_format`, through xgrammar).

Rows that ask for none of these keep the model's logits untouched, so their answers are what they were.
Logprobs are the model's own (log-softmax of its logits before any bias or grammar), as OpenAI reports them.
"""

from __future__ import annotations

import json

import torch


class RowLogits:
    """A transformers logits processor for a whole batch: each row's bias and grammar, and the logprobs each row
    wants kept for the token it picks next (`Row.take` reads them)."""

    def __init__(self, rows: list):
        self.rows = rows
        self.bias: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, input_ids, scores: torch.Tensor) -> torch.Tensor:
        wanted = [i for i, row in enumerate(self.rows) if row.request.settings.logprobs is not None]
        if wanted:
            logprobs = torch.log_softmax(scores[wanted].float(), dim=-1).cpu()
            for position, i in enumerate(wanted):
                self.rows[i].pending = logprobs[position]
        masked = [i for i, row in enumerate(self.rows) if row.matcher is not None and not row.matcher.is_terminated()]
        for i, row in enumerate(self.rows):
            if row.request.settings.logit_bias:
                ids, values = self._bias(i, row.request.settings.logit_bias, scores)
                scores[i, ids] += values
        if masked:
            import xgrammar as xgr

            bitmask = xgr.allocate_token_bitmask(len(self.rows), scores.shape[-1])
            for i in masked:
                self.rows[i].matcher.fill_next_token_bitmask(bitmask, i)
            xgr.apply_token_bitmask_inplace(scores, bitmask.to(scores.device), indices=masked)
        return scores

    def _bias(self, i: int, bias: dict[int, float], scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self.bias:
            ids = torch.tensor(list(bias), dtype=torch.long, device=scores.device)
            self.bias[i] = ids, torch.tensor(list(bias.values()), dtype=scores.dtype, device=scores.device)
        return self.bias[i]


def logprob_entry(tokenizer, logprobs: torch.Tensor, token: int, top: int) -> dict:
    """OpenAI's `choices[i].logprobs.content[]` item for one generated token: it, its logprob, and the `top` most
    likely tokens at that step."""

    def spelled(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    entry = spelled(token, logprobs[token].item())
    if top:
        values, ids = logprobs.topk(top)
        entry["top_logprobs"] = [spelled(t, v) for t, v in zip(ids.tolist(), values.tolist())]
    else:
        entry["top_logprobs"] = []
    return entry


class Grammars:
    """One engine's compiled JSON grammars (xgrammar), by response_format, and a matcher per row that uses one."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = list(stop_ids)
        self.compiler = None
        self.compiled: dict[str, object] = {}

    def compile(self, response_format: dict):
        """The compiled grammar of a response_format (json_object, or json_schema with its schema); a ValueError
        names what is wrong with a schema."""
        key = json.dumps(response_format, sort_keys=True)
        if key not in self.compiled:
            import xgrammar as xgr

            if self.compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
                )
                self.compiler = xgr.GrammarCompiler(info)
            # compact JSON: free whitespace lets a weak model pad forever without ever closing the object
            if response_format["type"] == "json_object":
                grammar = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
            else:
                spec = response_format["json_schema"]
                try:
                    grammar = self.compiler.compile_json_schema(
                        json.dumps(spec.get("schema") or {}),
                        any_whitespace=False,
                        strict_mode=bool(spec.get("strict")),
                    )
                except RuntimeError as exc:
                    raise ValueError(str(exc)) from None
            self.compiled[key] = grammar
        return self.compiled[key]

    def matcher(self, response_format: dict):
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(response_format))
