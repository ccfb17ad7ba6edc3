"""One loaded chat system (base, fine-tuned, or a given adapter / merged folder) that answers chats.

Prompts are rendered with the chat template the system was trained with (the one
stored in `adapter/`), and generation stops at that template's end-of-turn token.
Batches are left-padded and grouped by prompt length, so a batch wastes little on
padding and every row's last prompt token sits at the same position.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

# what generation takes and gives, and where a system's weights are, live in generation.py (no torch there), for
# systems, the batcher and the server; imported here too, so `from tuneforge.engine.transformers import Settings` works
from tuneforge.engine.generation import Answer, Settings, available_systems, finished_answer, prompt_text, system_source  # noqa: F401
from tuneforge.engine.prompt import prompt_ids

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir


class Engine:
    """One system: a model (its own, or a base shared with other systems, see engine/pool.py), its tokenizer and
    chat encoder; thread-safe (one generate call per base at a time, concurrent single conversations batched
    together by `answer` and `stream`, across every system on the base)."""

    def __init__(self, model, tokenizer, name: str = "base", base=None, adapter: str | None = None):
        from tuneforge.data.chat import ChatEncoder
        from tuneforge.engine.base import Base, mixable

        self.name = name
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.encoder = ChatEncoder(tokenizer)
        self.base = base if base is not None else Base(model, name)
        self.adapter = adapter  # the adapter folder this system adds to a shared base; None: the base as it is
        self.mixable = mixable(adapter)  # whether its rows may share a batch with other adapters' rows
        self.pooled = base is not None
        self.stop_ids = self.encoder.stop_ids
        self._model = None
        self._grammars = None

    @property
    def model(self):
        """The model to run this system's forward passes with: the base's own model for an engine of its own, else a
        view of the shared base that applies this system's adapter (or none)."""
        if not self.pooled:
            return self.base.model
        if self._model is None:
            from tuneforge.engine.base import AdapterModel

            self._model = AdapterModel(self.base, self.adapter)
        return self._model

    @property
    def lock(self):
        return self.base.lock

    @property
    def device(self):
        return self.base.device

    @property
    def max_batch(self) -> int:
        return self.base.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self.base.max_batch = value

    @classmethod
    def load(
        cls,
        experiment: Experiment,
        name: str = "base",
        run: RunDir | None = None,
        adapter: str | None = None,
        merged: str | None = None,
        quantization: str | None = None,
    ) -> Engine:
        """Load a system: `name` resolved in the run, or an explicit adapter / merged folder."""
        from tuneforge.models import load_model, load_tokenizer, materialize, plan_device, resolve

        if run is not None and adapter is None and merged is None:
            adapter, merged = system_source(name, run)
        update: dict = {} if quantization is None else {"quantization": quantization}
        if merged:
            update["ref"] = merged
        section = experiment.model.model_copy(update=update)
        plan = plan_device(section)
        location = materialize(resolve(section.ref))
        # the tokenizer, and so the chat template, that the system was trained with
        tokenizer = load_tokenizer(section, adapter or merged or location)
        model = load_model(section, plan, location)
        if plan.device == "cpu" and plan.quantization == "4bit":
            from tuneforge.models import keep_4bit_layers_differentiable

            # bitsandbytes' CPU inference repack (bf16 scales) gives answers that change with the batch a prompt
            # lands in (13/16 identical greedy answers one-by-one vs batched); the training path gives 16/16
            keep_4bit_layers_differentiable(model)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        return cls(model, tokenizer, name)

    # logprobs, logit_bias and response_format are honoured (engine/logits.py); the server asks before it answers
    shapes_logits = True

    @property
    def vocab_size(self) -> int:
        """Rows of the model's logits: the token ids a logit_bias may name."""
        return self.base.model.get_output_embeddings().weight.shape[0]

    def grammars(self):
        """This system's compiled response_format grammars (xgrammar), made on first use."""
        if self._grammars is None:
            from tuneforge.engine.logits import Grammars

            self._grammars = Grammars(self.tokenizer, self.vocab_size, self.stop_ids)
        return self._grammars

    def prompt_ids(self, messages: list[dict], settings: Settings | None = None) -> list[int]:
        return prompt_ids(self.encoder, messages, settings)

    def run_kwargs(self, rows: int) -> dict:
        """Under the base's lock: what makes the base's next pass use this system's adapter for `rows` rows."""
        return self.base.prepare([self.adapter] * rows) if self.pooled else {}

    def _generate_kwargs(self, settings: Settings) -> dict:
        kwargs = dict(
            max_new_tokens=settings.max_new_tokens, eos_token_id=self.stop_ids, pad_token_id=self.tokenizer.pad_token_id
        )
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        return kwargs

    def generate(
        self, conversations: list[list[dict]], settings: Settings, batch_size: int = 16, progress: bool = False
    ) -> list[Answer]:
        """Answers in input order; batched by similar prompt length."""
        from tqdm.auto import tqdm

        if settings.shapes_logits:  # per-row logits work lives in the batcher
            return [self.answer(messages, settings) for messages in conversations]

        prompts = [self.prompt_ids(m, settings) for m in conversations]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[Answer | None] = [None] * len(prompts)
        with (
            self.lock,
            tqdm(total=len(prompts), desc=f"generating ({self.name})", unit=" prompts", disable=not progress) as bar,
        ):
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.full((len(chunk), width), self.tokenizer.pad_token_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                    mask[row, width - len(prompts[i]) :] = 1
                extra = self.run_kwargs(len(chunk))
                with torch.no_grad():
                    out = self.base.model.generate(
                        input_ids=ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        **self._generate_kwargs(settings),
                        **extra,
                    )
                for row, i in enumerate(chunk):
                    answers[i] = self._answer(out[row, width:].tolist(), len(prompts[i]), settings)
                bar.update(len(chunk))
        return answers  # type: ignore[return-value]

    def _answer(self, new_ids: list[int], prompt_tokens: int, settings: Settings) -> Answer:
        finish = "length"
        for position, token in enumerate(new_ids):
            if token in self.stop_ids:
                new_ids, finish = new_ids[:position], "stop"
                break
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        for stop in settings.stop:
            if stop in text:
                text, finish = text[: text.index(stop)], "stop"
        return finished_answer(self.encoder, text, prompt_tokens, len(new_ids), finish, settings)

    def batcher(self):
        """The dynamic batcher that lets concurrent callers (server threads, demo users) share generate calls; one
        per base, so the systems on a shared base share it."""
        return self.base.batcher()

    def answer(self, messages: list[dict], settings: Settings) -> Answer:
        """One conversation's answer, batched with whatever other callers are asking at the same time."""
        return self.batcher().answer(self, self.prompt_ids(messages, settings), settings)

    def stream(self, messages: list[dict], settings: Settings) -> Iterator[str | Answer]:
        """Text pieces as they are generated; the final item is an Answer with the totals.

        Batched with concurrent callers. Closing the iterator early (a client that hung up) ends this
        conversation's row; an error in generation ends the stream with that error and frees the model.
        """
        return self.batcher().stream(self, self.prompt_ids(messages, settings), settings)
