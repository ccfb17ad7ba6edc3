"""The optional vLLM generation engine (`model.engine: vllm`), behind the same interface as `Engine`.

Prompts are rendered by tuneforge's own ChatEncoder from the system's stored chat
template and handed to vLLM as token ids, so vLLM sees exactly the tokens the
transformers engine (and training) would. The adapter is applied with a
LoRARequest instead of being merged. vLLM needs a CUDA GPU; anywhere else this
module refuses with the reason before anything loads.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Iterator

from tuneforge.errors import TuneforgeError
from tuneforge.infer.generation import Answer, Settings, finished_answer, prompt_text


def check_available() -> None:
    """Refuse clearly when vLLM cannot run here."""
    if importlib.util.find_spec("vllm") is None:
        raise TuneforgeError("model.engine: vllm needs the vllm package on a CUDA machine (pip install vllm); "
                             "use model.engine: transformers otherwise")
    import torch

    if not torch.cuda.is_available():
        raise TuneforgeError("model.engine: vllm needs a CUDA GPU and torch sees none; use model.engine: transformers on this machine")


class VLLMEngine:
    """Batched generation through vllm.LLM; one engine per system, like Engine."""

    def __init__(self, llm, tokenizer, name: str, lora=None):
        from tuneforge.data.chat import ChatEncoder

        self.llm, self.tokenizer, self.name, self.lora = llm, tokenizer, name, lora
        self.encoder = ChatEncoder(tokenizer)
        self.stop_ids = self.encoder.stop_ids

    @classmethod
    def load(cls, experiment, name: str = "base", run=None) -> VLLMEngine:
        check_available()
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        from tuneforge.infer.generation import system_source
        from tuneforge.models import load_tokenizer, materialize, plan_device, resolve

        adapter, merged = system_source(name, run) if run is not None else (None, None)
        section = experiment.model if not merged else experiment.model.model_copy(update={"ref": merged})
        plan = plan_device(section)
        location = materialize(resolve(section.ref))
        tokenizer = load_tokenizer(section, adapter or merged or location)
        options = dict(model=str(location), tokenizer=str(adapter or merged or location), dtype=plan.dtype, seed=experiment.seed,
                       enable_lora=adapter is not None)
        if plan.quantization == "4bit":
            options["quantization"] = "bitsandbytes"  # the same NF4 base weights the adapter was trained against
        if adapter is not None:
            options["max_lora_rank"] = max(8, int(json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]))
        llm = LLM(**options)
        lora = LoRARequest(name, 1, str(adapter)) if adapter is not None else None
        return cls(llm, tokenizer, name, lora)

    def prompt_ids(self, messages: list[dict], settings: Settings | None = None) -> list[int]:
        return self.tokenizer(prompt_text(self.encoder, messages, settings), add_special_tokens=False)["input_ids"]

    def _params(self, settings: Settings):
        from vllm import SamplingParams

        return SamplingParams(max_tokens=settings.max_new_tokens, temperature=settings.temperature,
                              top_p=settings.top_p if settings.temperature > 0 else 1.0, seed=settings.seed,
                              stop=list(settings.stop) or None, stop_token_ids=list(self.stop_ids), skip_special_tokens=True)

    def generate(self, conversations: list[list[dict]], settings: Settings, batch_size: int = 16, progress: bool = False) -> list[Answer]:
        """vLLM schedules the whole list itself (continuous batching), so batch_size is not used."""
        prompts = [{"prompt_token_ids": self.prompt_ids(m, settings)} for m in conversations]
        outputs = self.llm.generate(prompts, self._params(settings), lora_request=self.lora, use_tqdm=progress)
        answers = []
        for prompt, output in zip(prompts, outputs):
            best = output.outputs[0]
            finish = "length" if best.finish_reason == "length" else "stop"
            answers.append(finished_answer(self.encoder, best.text, len(prompt["prompt_token_ids"]), len(best.token_ids), finish, settings))
        return answers

    def stream(self, messages: list[dict], settings: Settings) -> Iterator[str | Answer]:
        """The offline LLM does not stream: the whole answer comes as one piece."""
        answer = self.generate([messages], settings)[0]
        if answer.text:
            yield answer.text
        yield answer
