"""One copy of each base model per process, with every adapter system loaded onto it by name.

A fine-tuned system (finetuned, previous, adapter:<dir>, serve's `ft:` models and
their checkpoints) is a LoRA adapter of a few MB on a base of hundreds of MB or
many GB. Each used to load its own full copy of the base and keep it: four `ft:`
models of one project took serve from 1,148 to 3,347 MB on the 135M builtin. Here
the engines of one base (the same weights: reference, revision, device, dtype,
quantization) share one `Base`: one model, one lock, one dynamic batcher.

Adapters are loaded onto the base by name (PEFT's `load_adapter`), and one batch
may carry rows for different adapters (PEFT's mixed-adapter batches,
`adapter_names=[...]`, where `__base__` is a row with adapters off), so concurrent
users of different fine-tunes share forward passes as users of one model do. At
most `max_adapters` adapters stay loaded per base; loading one more unloads the
least recently used (`delete_adapter`), and a request for it later loads it again.
An adapter whose weights file changed on disk (retrained in place) is loaded anew.
DoRA and non-LoRA adapters cannot share a batch with other adapters (PEFT refuses
mixed batches for them), so their rows run in batches of their own.

Merged models are whole models of their own and stay separate engines (`Engine.load`).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.engine.base import DEFAULT_MAX_ADAPTERS, Base

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.engine.transformers import Engine
    from tuneforge.run import RunDir

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


class Pool:
    """The bases of one process by what makes their weights, and the tokenizers of its systems by content."""

    def __init__(self, max_adapters: int = DEFAULT_MAX_ADAPTERS):
        self.max_adapters = max_adapters  # per base; `serve --max-adapters`
        self.bases: dict[tuple, Base] = {}
        self.tokenizers: dict[tuple, object] = {}
        self.lock = threading.Lock()

    def engine(self, experiment: Experiment, name: str = "base", run: RunDir | None = None) -> Engine:
        """A system on its shared base: base (adapters off) or an adapter system. Merged models are not pooled."""
        from tuneforge.engine.generation import system_source
        from tuneforge.engine.transformers import Engine
        from tuneforge.models import materialize, plan_device, resolve

        adapter, merged = system_source(name, run)  # type: ignore[arg-type]  # base and adapter:<dir> need no run
        if merged:
            raise ValueError(f"system {name!r} is a merged model: load it with Engine.load, not onto a shared base")
        section = experiment.model
        plan = plan_device(section)
        location = materialize(resolve(section.ref))
        with self.lock:
            base = self._base(section, plan, location)
            tokenizer = self._tokenizer(section, adapter or location)
        return Engine(None, tokenizer, name, base=base, adapter=str(Path(adapter).resolve()) if adapter else None)

    def _base(self, section, plan, location: str) -> Base:
        key = (str(location), section.revision, section.trust_remote_code, plan.device, plan.dtype, plan.quantization)
        key += (plan.attention,)
        if key not in self.bases:
            from tuneforge.models import load_model

            model = load_model(section, plan, location)
            if plan.device == "cpu" and plan.quantization == "4bit":
                from tuneforge.models import keep_4bit_layers_differentiable

                # bitsandbytes' CPU inference repack (bf16 scales) gives answers that change with the batch a prompt
                # lands in (13/16 identical greedy answers one-by-one vs batched); the training path gives 16/16
                keep_4bit_layers_differentiable(model)
            self.bases[key] = Base(model, Path(str(location)).name, self.max_adapters)
        self.bases[key].max_adapters = self.max_adapters
        return self.bases[key]

    def _tokenizer(self, section, folder: str):
        """One tokenizer object per distinct set of tokenizer files (about 33 MB each for SmolLM2's): adapters
        saved with the base's tokenizer share it."""
        from tuneforge.models import load_tokenizer

        digest, found = hashlib.sha256(), False
        for file in TOKENIZER_FILES:
            path = Path(folder) / file
            if path.is_file():
                digest.update(file.encode() + b"\0" + path.read_bytes() + b"\0")
                found = True
        content = digest.hexdigest() if found else folder  # no tokenizer files: the folder's own (it may fail)
        key = (content, section.chat_template, section.revision, section.trust_remote_code)
        if key not in self.tokenizers:
            self.tokenizers[key] = load_tokenizer(section, folder)
        return self.tokenizers[key]


_shared: Pool | None = None
_shared_lock = threading.Lock()


def shared_pool() -> Pool:
    """The process's pool: serve, demo, chat and eval load every base through it."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Pool()
        return _shared
