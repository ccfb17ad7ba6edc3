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

A token that straddles the start of an answer is learned with the answer. An
assistant message with `weight: 0` (OpenAI's format) is context, not a target.

Some templates render an earlier turn differently once later turns follow:
Mistral's moves the system prompt into the last user turn. A conversation there
cannot be one training sequence, since no turn but the last would match its
inference prompt; it becomes one sequence per trained assistant turn, each that
turn's inference prompt followed by its answer (`units`). An answer there is found
by its text; a tool call has none, so its turn starts where the template's rendering
of it departs from that of a plain answer in the same place, and the model learns the
call exactly as the template writes it.

A record the template cannot write (Llama-3.1 takes one call per turn, Mistral
9-character call ids, Hermes a description on every tool: each says so through
`raise_exception` or a failing expression) is a `TemplateRefusal` naming the message
and quoting the template, which prepare reports against that record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tuneforge.data.tools import convention_view, native_view, uses_tools
from tuneforge.errors import TuneforgeError

PROBE_CONTENT = "tuneforge-probe-answer"
# what a template that writes nothing without tools (Hermes' tool_use) is given to show its turn markers; a
# description and properties because such templates read both
PROBE_TOOL = {
    "type": "function",
    "function": {
        "name": "tuneforge_probe_function",
        "description": "A probe.",
        "parameters": {"type": "object", "properties": {}},
    },
}


class TemplateRefusal(TuneforgeError):
    """The chat template cannot write one record; `code` is the problem code prepare files it under."""

    def __init__(self, message: str, code: str = "template_refused"):
        super().__init__(message)
        self.code = code


def _template_fault(exc: Exception) -> bool:
    """An error the template raised over the data: its own raise_exception (TemplateError), an undefined field
    (UndefinedError), or an expression over a value it did not expect (TypeError: None + str, iterating None)."""
    from jinja2 import TemplateError

    return isinstance(exc, (TemplateError, TypeError))


def control_strings(tokenizer) -> list[str]:
    """The text of every special added token (ChatML's `<|im_start|>`, Llama-3's `<|start_header_id|>`...), longest
    first so that one containing another is found whole. In text a caller supplies these are plain text at inference
    (engine/prompt.py); prepare warns about training records that hold them (`control_token_in_content`)."""
    found = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special and t.content}
    found |= {t for t in getattr(tokenizer, "all_special_tokens", []) if t}
    return sorted(found, key=len, reverse=True)


def _trained(messages: list[dict]) -> list[int]:
    """The indices of the assistant turns the model learns (`weight: 0` makes one context)."""
    return [i for i, m in enumerate(messages) if m.get("role") == "assistant" and m.get("weight", 1) != 0]


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
        source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
        self.native_tools = "tools" in source  # the template renders `tools=` itself (Llama-3.1, Qwen2.5, Mistral)
        self._tool_role_found: str | None = None
        self._call_prefixes: dict[str, str] = {}
        self.end_of_turn = self._find_end_of_turn()
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(self.end_of_turn) if self.end_of_turn else None

    @property
    def stop_ids(self) -> list[int]:
        """Token ids generation stops at: the template's end-of-turn token, then eos."""
        ids = [self.end_of_turn_id, self.tokenizer.eos_token_id]
        return [i for i in dict.fromkeys(ids) if i is not None]

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """The template's text; tool calls, tool answers and `tools` through the template when it knows tools,
        else written in the `<tool_call>` convention (`data.tools`)."""
        if not uses_tools(messages, tools):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        if self.native_tools:
            return self.tokenizer.apply_chat_template(
                native_view(messages), tools=tools or None, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        return self.tokenizer.apply_chat_template(
            convention_view(messages, tools, self._tool_role()),
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def call_prefix(self, tools: list | None, tool_choice) -> str:
        """The start of a tool call as this template writes it, to put after the generation prompt when a call is
        required (tool_choice "required": up to the function's name; a named function: up to its arguments)."""
        if not tools or tool_choice in ("auto", "none", None):
            return ""
        import json

        key = json.dumps([tools, tool_choice], sort_keys=True)  # asked for each prompt and again for each answer
        if key not in self._call_prefixes:
            self._call_prefixes[key] = self._probe_call_prefix(tools, tool_choice)
        return self._call_prefixes[key]

    def _probe_call_prefix(self, tools: list, tool_choice) -> str:
        probe_name = "tuneforge_probe_function"
        call = {
            "id": "probe0001",  # 9 letters and digits: Mistral's template refuses any other call id
            "type": "function",
            "function": {"name": probe_name, "arguments": '{"tuneforge_probe": 1}'},
        }
        prompt = [{"role": "user", "content": "hi"}]
        head = self.render(prompt, add_generation_prompt=True, tools=tools)
        turn = self.render(prompt + [{"role": "assistant", "content": None, "tool_calls": [call]}], tools=tools)
        if not turn.startswith(head) or probe_name not in turn:
            return ""
        turn = turn[len(head) :]
        at = turn.index(probe_name)
        if tool_choice == "required":
            return turn[:at]
        name = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else str(tool_choice)
        arguments = turn.find("{", at)  # the arguments object follows the name
        # no trailing space: training saw it merged into the next token (" {"), so the model writes it itself
        return (turn[:at] + name + (turn[at + len(probe_name) : arguments] if arguments > 0 else "")).rstrip()

    def _tool_role(self) -> str:
        """`tool` where the template writes that role's turns, else `user`."""
        if self._tool_role_found is None:
            probe = [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "yo"},
                {"role": "tool", "content": PROBE_CONTENT},
            ]
            try:
                found = PROBE_CONTENT in self.tokenizer.apply_chat_template(probe, tokenize=False)
            except Exception:  # the template refuses the role (raise_exception)
                found = False
            self._tool_role_found = "tool" if found else "user"
        return self._tool_role_found

    def _find_end_of_turn(self) -> str | None:
        """The special token the template writes right after an assistant turn (<|im_end|>, <|eot_id|>, </s>...)."""
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE_CONTENT}]
        try:
            text = self.render(probe)
        except Exception as exc:
            if not _template_fault(exc):
                raise
            text = self.render(probe, tools=[PROBE_TOOL])  # a tools-only template (Hermes' tool_use)
        at = text.rfind(PROBE_CONTENT)
        if at < 0:  # the template rewrites answers; `units` names the problem when it meets one
            return None
        tail = text[at + len(PROBE_CONTENT) :].lstrip(" ")
        specials = sorted(
            set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab()), key=len, reverse=True
        )
        for token in specials:
            if token and tail.startswith(token):
                return token
        eos = self.tokenizer.eos_token
        return eos if eos and eos in tail else None

    def spans(self, messages: list[dict], tools: list | None = None) -> tuple[str, list[tuple[int, int, bool]]]:
        """The rendered training text and, per trained assistant turn, (start, end, has_end_of_turn) character spans.

        For a template that renders turns differently once later ones follow, this is the last training sequence
        (`units`), the one that ends at the last trained turn."""
        return self.units(messages, tools)[-1]

    def units(self, messages: list[dict], tools: list | None = None) -> list[tuple[str, list[tuple[int, int, bool]]]]:
        """The training sequences of one example as (text, spans).

        One sequence, the rendered conversation, when each trained turn's inference prompt is a prefix of it.
        Otherwise one per trained turn: that turn's inference prompt followed by the answer as the template
        writes it (Mistral folds the system prompt into the last user turn, Gemma 4 opens an empty thought
        channel in the generation prompt), so every sequence starts exactly as inference will.
        TemplateRefusal when the template cannot write the record."""
        whole = self._whole(messages, tools)
        if whole is not None:
            return [whole]
        return [self._turn_alone(messages, i, tools) for i in _trained(messages)]

    def _whole(self, messages: list[dict], tools: list | None) -> tuple[str, list[tuple[int, int, bool]]] | None:
        try:
            full = self.render(messages, tools=tools)
        except Exception as exc:
            if not _template_fault(exc):
                raise
            for i in _trained(messages):  # the shorter conversations first: the first refused names its message
                if i:
                    self._render_upto(messages, i, tools, prompt=True)
                self._render_upto(messages, i + 1, tools)
            raise self._refusal(messages, len(messages), tools, exc) from exc  # refused after the last answer
        spans = []
        for i in _trained(messages):
            prompt = self._render_upto(messages, i, tools, prompt=True) if i else ""
            upto = self._render_upto(messages, i + 1, tools)
            if not (full.startswith(upto) and upto.startswith(prompt)):
                return None
            spans.append(self._answer_span(prompt, upto[len(prompt) :]))
        return full, spans

    def _turn_alone(self, messages: list[dict], i: int, tools: list | None) -> tuple[str, list[tuple[int, int, bool]]]:
        prompt = self._render_upto(messages, i, tools, prompt=True) if i else ""
        upto = self._render_upto(messages, i + 1, tools)
        if not upto.startswith(prompt):
            at = self._turn_start(messages, i, tools, upto)
            if at < 0:
                raise TemplateRefusal(
                    f"the chat template does not write assistant message {i + 1}'s content where it can be found, "
                    "so its inference prompt cannot be matched; use a template that renders each turn as a prefix",
                    "template_answer_not_found",
                )
            while at > 0 and upto[at - 1] in " \t" and not prompt.endswith((" ", "\t")):
                at -= 1  # the space some templates write between the prompt and the answer ("[/INST] Paris.")
            upto = prompt + upto[at:]
        return upto, [self._answer_span(prompt, upto[len(prompt) :])]

    def _turn_start(self, messages: list[dict], i: int, tools: list | None, upto: str) -> int:
        """Where assistant message i's own text starts in `upto` (the conversation rendered up to it), or -1.

        Found by its content where it has some. A tool call has none: there the template's rendering departs from
        that of a plain answer in the same place, since both share everything before the turn, and what follows
        must write each called function's name."""
        message = messages[i]
        content = message.get("content")
        calls = message.get("tool_calls") or []
        if isinstance(content, str) and content.strip():
            at = upto.rfind(content.strip())
            if at >= 0 or not calls:  # Mistral's writes the calls of a message alone, without its content
                return at
        if not calls:
            return -1
        try:
            plain = self.render([*messages[:i], {"role": "assistant", "content": PROBE_CONTENT}], tools=tools)
        except Exception as exc:
            if not _template_fault(exc):
                raise
            return -1
        at = len(os.path.commonprefix([upto, plain]))
        names = [str((call.get("function") or {}).get("name")) for call in calls]
        return at if all(name in upto[at:] for name in names) else -1

    def _render_upto(self, messages: list[dict], k: int, tools: list | None, prompt: bool = False) -> str:
        """The first k messages rendered, with the generation prompt when `prompt`; where the template refuses
        them, a TemplateRefusal naming message k, the last it was given."""
        try:
            return self.render(messages[:k], add_generation_prompt=prompt, tools=tools)
        except Exception as exc:
            if not _template_fault(exc):
                raise
            raise self._refusal(messages, k, tools, exc) from exc

    def _refusal(self, messages: list[dict], k: int, tools: list | None, exc: Exception) -> TemplateRefusal:
        said = f'saying "{exc}"' if str(exc) else f"with {type(exc).__name__}"
        rule = (
            "a record trains as the model's chat template writes it, the same template inference uses, so one it "
            "cannot write cannot be trained: change the record, or the template (model.chat_template)"
        )
        try:  # blame the tools list, or the lack of one, where the template cannot write even a single question
            self.render([{"role": "user", "content": "hi"}], tools=tools)
        except Exception as probe:
            if not _template_fault(probe):
                raise
            part = "the record's tools list" if tools else "a record without tools (it needs a tools list)"
            return TemplateRefusal(f"the chat template refuses {part}, {said}; {rule}")
        message = messages[k - 1]
        calls = message.get("tool_calls") or []
        count = f", {len(calls)} tool call{'' if len(calls) == 1 else 's'}" if calls else ""
        return TemplateRefusal(f"the chat template refuses message {k} ({message.get('role')}{count}), {said}; {rule}")

    def _answer_span(self, prompt: str, turn: str) -> tuple[int, int, bool]:
        eot_at = turn.rfind(self.end_of_turn) if self.end_of_turn else -1
        if eot_at >= 0:
            return len(prompt), len(prompt) + eot_at + len(self.end_of_turn), True
        return len(prompt), len(prompt) + len(turn.rstrip()), False

    def encode(self, messages: list[dict], tools: list | None = None) -> Encoded:
        return self.encode_many([messages], [tools])[0]

    def encode_many(self, conversations: list[list[dict]], tools: list | None = None) -> list[Encoded]:
        """One encoded sequence per conversation (the last of its `units`), in one batched tokenizer call;
        `tools`: each conversation's tools list (or None)."""
        tools = tools or [None] * len(conversations)
        return self._encode_units([self.spans(messages, t) for messages, t in zip(conversations, tools)])

    def encode_prompt(self, messages: list[dict], tools: list | None = None) -> Encoded:
        """A conversation to be answered as the model reads it (generation prompt added); no token is a target."""
        ids = self.tokenizer(self.render(messages, add_generation_prompt=True, tools=tools), add_special_tokens=False)
        return Encoded(list(ids["input_ids"]), [False] * len(ids["input_ids"]))

    def encode_examples(self, conversations: list[list[dict]], tools: list | None = None) -> list[list[Encoded]]:
        """Per example, every training sequence (`units`), all in one batched tokenizer call."""
        tools = tools or [None] * len(conversations)
        units = [self.units(messages, t) for messages, t in zip(conversations, tools)]
        flat = self._encode_units([unit for each in units for unit in each])
        out, at = [], 0
        for each in units:
            out.append(flat[at : at + len(each)])
            at += len(each)
        return out

    def _encode_units(self, rendered: list[tuple[str, list[tuple[int, int, bool]]]]) -> list[Encoded]:
        if not rendered:
            return []
        if not getattr(self.tokenizer, "is_fast", False):
            return self._encode_by_pieces(rendered)  # no offset mapping: cut the text where the spans are
        batch = self.tokenizer([full for full, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets, (_, spans) in zip(batch["input_ids"], batch["offset_mapping"], rendered):
            mask = [
                any(begin < end and max(stop, begin + 1) > start for start, end, _ in spans) for begin, stop in offsets
            ]
            out.append(Encoded(list(ids), mask, missing_eot=any(not has_eot for _, _, has_eot in spans)))
        return out

    def _encode_by_pieces(self, rendered: list[tuple[str, list[tuple[int, int, bool]]]]) -> list[Encoded]:
        """For tokenizers without offsets: each prompt piece and answer piece tokenized on its own."""
        pieces: list[str] = []
        layout: list[list[tuple[int, bool]]] = []  # per example: (piece index, supervised)
        missing = []
        for full, spans in rendered:
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

    def fit(
        self, messages: list[dict], max_length: int, policy: str, tools: list | None = None
    ) -> tuple[list[dict], list[Encoded]]:
        """Encode one example's training sequences, shortening by `policy` when one is longer than max_length.

        truncate: shorten the longest non-assistant message first (a long review, a long
        document), then cut from the right if the answer itself is too long. The caller
        handles drop and error.
        """
        (encoded,) = self.encode_examples([messages], [tools])
        if max(len(e.input_ids) for e in encoded) <= max_length or policy != "truncate":
            return messages, encoded
        messages = [dict(m) for m in messages]
        for _ in range(3):
            excess = max(len(e.input_ids) for e in encoded) - max_length
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
            (encoded,) = self.encode_examples([messages], [tools])
        out = []
        for sequence in encoded:
            if len(sequence.input_ids) > max_length:
                sequence = Encoded(
                    sequence.input_ids[:max_length],
                    sequence.supervised[:max_length],
                    missing_eot=sequence.missing_eot or self._cut_eot(sequence, max_length),
                )
            sequence.truncated = True
            out.append(sequence)
        return messages, out

    def _cut_eot(self, encoded: Encoded, max_length: int) -> bool:
        return self.end_of_turn_id is not None and self.end_of_turn_id in encoded.input_ids[max_length:]
