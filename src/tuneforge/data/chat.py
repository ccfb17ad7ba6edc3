"""Chat examples to token ids with a mask of the positions the model learns.

The rendering comes from the model's own chat template, so training sees exactly
what inference will send. The rendered conversation is tokenized once, as a whole,
exactly as inference tokenizes a rendered prompt; the positions the model must
produce (each assistant turn's content and its end-of-turn token) are found from
character spans of the rendered text through the tokenizer's offset mapping:

* the prompt rendered at inference (`add_generation_prompt=True`) is a token
  prefix of the training sequence, on byte-level BPE and SentencePiece alike
  (tokenizing each piece on its own put a SentencePiece "▁" at every piece start:
  `▁Paris` where the whole text says `Par`,`is`);
* supervision needs no `{% generation %}` markers in the template;
* no BOS is added on top of the one the template writes (no double BOS).

A token that straddles the start of an answer is learned with the answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.errors import TuneforgeError

PROBE_CONTENT = "tuneforge-probe-answer"


@dataclass
class Encoded:
    input_ids: list[int]
    supervised: list[bool]  # True where the token is a training target
    truncated: bool = False
    missing_eot: bool = False  # some assistant turn has no end-of-turn token in the sequence

    @property
    def n_trainable(self) -> int:
        return sum(self.supervised)

    def labels(self, ignore_index: int = -100) -> list[int]:
        """Targets for a causal LM whose loss shifts labels internally (transformers' convention)."""
        return [tok if keep else ignore_index for tok, keep in zip(self.input_ids, self.supervised)]


class ChatEncoder:
    """Render, cut and tokenize chat examples with one tokenizer's chat template."""

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TuneforgeError("the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.end_of_turn = self._find_end_of_turn()
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn) if self.end_of_turn else None

    @property
    def stop_ids(self) -> list[int]:
        """Token ids generation stops at: the template's end-of-turn token, then eos."""
        ids = [self.end_of_turn_id, self.tokenizer.eos_token_id]
        return [i for i in dict.fromkeys(ids) if i is not None]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _find_end_of_turn(self) -> str | None:
        """The special token the template writes right after an assistant turn (<|im_end|>, <|eot_id|>, </s>...)."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE_CONTENT}]
        text = self.render(probe)
        tail = text[text.rindex(PROBE_CONTENT) + len(PROBE_CONTENT) :].lstrip(" ")
        specials = sorted(set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab()), key=len, reverse=True)
        for token in specials:
            if token and tail.startswith(token):
                return token
        eos = self.tokenizer.eos_token
        return eos if eos and eos in tail else None

    def spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int, bool]]]:
        """The rendered text and, per assistant turn, (start, end, has_end_of_turn) character spans."""
        full = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[: i + 1])
            if not (full.startswith(upto) and upto.startswith(prompt)):
                raise TuneforgeError(
                    "the chat template renders earlier turns differently once later turns follow, "
                    "so the prompt at inference would not match training; use a template without that behaviour"
                )
            turn = upto[len(prompt) :]
            eot_at = turn.rfind(self.end_of_turn) if self.end_of_turn else -1
            if eot_at >= 0:
                spans.append((len(prompt), len(prompt) + eot_at + len(self.end_of_turn), True))
            else:
                spans.append((len(prompt), len(prompt) + len(turn.rstrip()), False))
        return full, spans

    def encode(self, messages: list[dict]) -> Encoded:
        return self.encode_many([messages])[0]

    def encode_many(self, conversations: list[list[dict]]) -> list[Encoded]:
        """Encode many examples with one batched call into the fast tokenizer."""
        if not getattr(self.tokenizer, "is_fast", False):
            return self._encode_by_pieces(conversations)  # no offset mapping: cut the text where the spans are
        rendered = [self.spans(messages) for messages in conversations]
        if not rendered:
            return []
        batch = self.tokenizer([full for full, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, (_, spans) in zip(batch["input_ids"], batch["offset_mapping"], rendered):
            mask = [any(begin < end and max(stop, begin + 1) > start for start, end, _ in spans) for begin, stop in offsets]
            out.append(Encoded(list(ids), mask, missing_eot=any(not has_eot for _, _, has_eot in spans)))
        return out

    def _encode_by_pieces(self, conversations: list[list[dict]]) -> list[Encoded]:
        """For tokenizers without offsets: each prompt piece and answer piece tokenized on its own."""
        pieces: list[str] = []
        layout: list[list[tuple[int, bool]]] = []  # per example: (piece index, supervised)
        missing = []
        for messages in conversations:
            full, spans = self.spans(messages)
            parts, cursor = [], 0
            for start, end, _ in spans:
                parts += [(full[cursor:start], False), (full[start:end], True)]
                cursor = end
            parts.append((full[cursor:], False))
            layout.append([])
            for text, supervised in parts:
                if text:
                    layout[-1].append((len(pieces), supervised))
                    pieces.append(text)
            missing.append(any(not has_eot for _, _, has_eot in spans))
        piece_ids = self.tokenizer(pieces, add_special_tokens=False)["input_ids"] if pieces else []
        out = []
        for parts, no_eot in zip(layout, missing):
            ids: list[int] = []
            mask: list[bool] = []
            for index, supervised in parts:
                ids += piece_ids[index]
                mask += [supervised] * len(piece_ids[index])
            out.append(Encoded(ids, mask, missing_eot=no_eot))
        return out

    def fit(self, messages: list[dict], max_length: int, policy: str) -> tuple[list[dict], Encoded]:
        """Encode, shortening by `policy` when the example is longer than max_length.

        truncate: shorten the longest non-assistant message first (a long review, a long
        document), then cut from the right if the answer itself is too long. The caller
        handles drop and error.
        """
        encoded = self.encode(messages)
        if len(encoded.input_ids) <= max_length or policy != "truncate":
            return messages, encoded
        messages = [dict(m) for m in messages]
        for _ in range(3):
            excess = len(encoded.input_ids) - max_length
            if excess <= 0:
                break
            prompts = [m for m in messages if m.get("role") != "assistant" and isinstance(m.get("content"), str)]
            if not prompts:
                break
            longest = max(prompts, key=lambda m: len(m["content"]))
            content_ids = self.tokenizer(longest["content"], add_special_tokens=False)["input_ids"]
            keep = len(content_ids) - excess - 4  # a little slack: re-tokenizing at the cut can shift by a token or two
            if keep < 8:
                break
            longest["content"] = self.tokenizer.decode(content_ids[:keep]).rstrip() + " …"
            encoded = self.encode(messages)
        if len(encoded.input_ids) > max_length:
            encoded = Encoded(
                encoded.input_ids[:max_length],
                encoded.supervised[:max_length],
                missing_eot=encoded.missing_eot or self._cut_eot(encoded, max_length),
            )
        encoded.truncated = True
        return messages, encoded

    def _cut_eot(self, encoded: Encoded, max_length: int) -> bool:
        return self.end_of_turn_id is not None and self.end_of_turn_id in encoded.input_ids[max_length:]
