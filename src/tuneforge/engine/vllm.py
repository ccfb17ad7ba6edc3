"""The optional vLLM generation engine (`model.engine: vllm`), behind the same interface as `Engine`.

Prompts are rendered by tuneforge's own ChatEncoder from the system's stored chat
template and handed to vLLM as token ids, so vLLM sees exactly the tokens the
transformers engine (and training) would. The adapter is applied with a
LoRARequest instead of being merged. vLLM needs a CUDA GPU; anywhere else this
module refuses with the reason before anything loads.

One vLLM engine serves every system on the same base: base, finetuned, other
adapters and the fine-tuning API's `ft:` models are LoRA requests on one set of
weights and one KV cache (each engine would otherwise take its own share of the
GPU, 90% by vLLM's default, and the second one would not fit). Only a merged
model, whose weights differ, gets an engine of its own. The engines of one
process share `model.vllm_memory` of the GPU between them.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.engine.generation import Answer, Settings, finished_answer
from tuneforge.engine.prompt import prompt_ids
from tuneforge.errors import TuneforgeError

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir


def check_available() -> None:
    """Refuse clearly when vLLM cannot run here."""
    if importlib.util.find_spec("vllm") is None:
        raise TuneforgeError(
            "model.engine: vllm needs the vllm package on a CUDA machine (pip install vllm); "
            "use model.engine: transformers otherwise"
        )
    import torch

    if not torch.cuda.is_available():
        raise TuneforgeError(
            "model.engine: vllm needs a CUDA GPU and torch sees none; use model.engine: transformers on this machine"
        )


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
DEFAULT_MAX_LORAS = (
    4  # adapters resident on the GPU at once; vLLM swaps others in from CPU memory as requests need them
)
LORA_RANK_FLOOR = (
    64  # slots this wide hold the usual adapters met after the engine starts; 4 of them cost ~1.3 GB on an 8B base
)


class VLLMPool:
    """The vLLM engines of one process: one per distinct base (reference and quantization), every adapter a LoRA
    request on its base's engine, and one memory budget split between the bases."""

    def __init__(self, experiment: Experiment, bases: int = 1, max_lora_rank: int = 16):
        self.experiment = experiment
        self.bases = max(1, bases)  # engines expected, so each new one takes its share of the budget, no more
        self.max_lora_rank = max_lora_rank
        self.engines: dict[tuple[str, str], object] = {}
        self.lora_ids: dict[str, int] = {}

    def share(self) -> float:
        return round(self.experiment.model.vllm_memory / self.bases, 3)

    def engine(self, location: str, tokenizer: str, dtype: str, quantization: str):
        key = (str(location), quantization)
        if key not in self.engines:
            if len(self.engines) >= self.bases:
                raise TuneforgeError(
                    f"vLLM: a base model beyond the {self.bases} planned ({location}) would not fit the memory "
                    f"budget model.vllm_memory={self.experiment.model.vllm_memory}; serve merged models from "
                    "separate processes, or use adapters on one base"
                )
            from vllm import LLM

            options = dict(
                model=str(location),
                tokenizer=str(tokenizer),
                dtype=dtype,
                seed=self.experiment.seed,
                gpu_memory_utilization=self.share(),
                enable_lora=True,
                max_loras=DEFAULT_MAX_LORAS,
                max_lora_rank=lora_rank_slot(self.max_lora_rank),
            )
            if quantization == "4bit":
                options["quantization"] = "bitsandbytes"  # the same NF4 base weights the adapters were trained against
            self.engines[key] = LLM(**options)
        return self.engines[key]

    def lora_request(self, name: str, adapter: str):
        """The request that applies `adapter` (one id per folder, so two names for one adapter share its slot)."""
        from vllm.lora.request import LoRARequest

        folder = str(Path(adapter).resolve())
        rank = adapter_rank(folder)
        if rank > lora_rank_slot(self.max_lora_rank):
            raise TuneforgeError(
                f"system {name!r}: adapter rank {rank} is above the rank the vLLM engine was started for "
                f"({lora_rank_slot(self.max_lora_rank)}); name every adapter system when the engine starts"
            )
        self.lora_ids.setdefault(folder, len(self.lora_ids) + 1)
        return LoRARequest(name, self.lora_ids[folder], folder)


def adapter_rank(folder: str) -> int:
    return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])


def lora_rank_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    fits = [r for r in VLLM_LORA_RANKS if r >= rank]
    if not fits:
        raise TuneforgeError(f"vLLM serves LoRA adapters up to rank {VLLM_LORA_RANKS[-1]}; this one has rank {rank}")
    return fits[0]


class VLLMEngine:
    """Batched generation through vllm.LLM: a system is its base's engine plus, for an adapter, its LoRA request."""

    def __init__(self, llm, tokenizer, name: str, lora=None):
        from tuneforge.data.chat import ChatEncoder

        self.llm, self.tokenizer, self.name, self.lora = llm, tokenizer, name, lora
        self.encoder = ChatEncoder(tokenizer)
        self.stop_ids = self.encoder.stop_ids

    @classmethod
    def load(
        cls, experiment: Experiment, name: str = "base", run: RunDir | None = None, pool: VLLMPool | None = None
    ) -> VLLMEngine:
        check_available()
        from tuneforge.engine.generation import system_source
        from tuneforge.models import load_tokenizer, materialize, plan_device, resolve

        adapter, merged = system_source(name, run) if run is not None else (None, None)
        pool = pool or VLLMPool(experiment, max_lora_rank=adapter_rank(adapter) if adapter else 16)
        section = experiment.model if not merged else experiment.model.model_copy(update={"ref": merged})
        plan = plan_device(section)
        location = materialize(resolve(section.ref))
        llm = pool.engine(location, merged or location, plan.dtype, plan.quantization)
        tokenizer = load_tokenizer(section, adapter or merged or location)  # the chat template the system trained with
        return cls(llm, tokenizer, name, pool.lora_request(name, adapter) if adapter else None)

    def prompt_ids(self, messages: list[dict], settings: Settings | None = None) -> list[int]:
        return prompt_ids(self.encoder, messages, settings)

    def _params(self, settings: Settings):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p if settings.temperature > 0 else 1.0,
            seed=settings.seed,
            stop=list(settings.stop) or None,
            stop_token_ids=list(self.stop_ids),
            skip_special_tokens=True,
        )

    def generate(
        self, conversations: list[list[dict]], settings: Settings, batch_size: int = 16, progress: bool = False
    ) -> list[Answer]:
        """vLLM schedules the whole list itself (continuous batching), so batch_size is not used."""
        prompts = [{"prompt_token_ids": self.prompt_ids(m, settings)} for m in conversations]
        outputs = self.llm.generate(prompts, self._params(settings), lora_request=self.lora, use_tqdm=progress)
        answers = []
        for prompt, output in zip(prompts, outputs):
            best = output.outputs[0]
            finish = "length" if best.finish_reason == "length" else "stop"
            answers.append(
                finished_answer(
                    self.encoder, best.text, len(prompt["prompt_token_ids"]), len(best.token_ids), finish, settings
                )
            )
        return answers

    def stream(self, messages: list[dict], settings: Settings) -> Iterator[str | Answer]:
        """The offline LLM does not stream: the whole answer comes as one piece."""
        answer = self.generate([messages], settings)[0]
        if answer.text:
            yield answer.text
        yield answer
