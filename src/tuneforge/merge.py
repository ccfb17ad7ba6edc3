"""`tuneforge merge`: the adapter folded into a full-precision copy of the base.

Never into 4-bit weights: the base is loaded de-quantized (quantization none, the
device's full dtype), the adapter applied and merged, and the result saved as
safetensors with the tokenizer, chat template and generation config. A probe set
is then answered greedily by the adapter-on-base model and by the merged model;
every mismatch is reported.

The merged weights are stored in one dtype (the device's full dtype unless
`--dtype` says otherwise). In bfloat16 a short fine-tune's update can sit below
the weights' rounding step (8 significant bits): measured on an H200, a 40-step
SmolLM2 adapter merged in bfloat16 changed 7 of 8 greedy probe answers, which
is why the probes exist and why float32 is offered.

With --gguf the merged folder is also exported for llama.cpp and Ollama (`gguf_export`), and the same probes are
answered from the GGUF file: every answer that differs from the merged model's is reported as drift.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.atomic import atomic_dir, atomic_write_json
from tuneforge.errors import TuneforgeError
from tuneforge.gguf_export import Tools, export, find_tools, gguf_answers, trained

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

PROBES = [
    "What is the capital of France?",
    "Give me one tip for writing clear emails.",
    "Summarise what a thermostat does in one sentence.",
    "Is this review positive or negative? 'Broke after two days.'",
]


def probe_prompts(run: RunDir, n: int = 8) -> list[list[dict]]:
    """Prompts from the run's validation split (its own domain), topped up with general ones."""
    prompts: list[list[dict]] = []
    valid = run.sub("data", "valid.jsonl")
    if valid.exists():
        from tuneforge.data.prepared import load_prepared

        for example in load_prepared(run.sub("data"), "valid")[:n]:
            last = max(i for i, m in enumerate(example.messages) if m["role"] == "assistant")
            prompts.append(example.messages[:last])
    prompts += [[{"role": "user", "content": p}] for p in PROBES[: max(0, n - len(prompts))]]
    return prompts


def merge(
    experiment: Experiment,
    run: RunDir,
    max_new_tokens: int = 48,
    gguf: bool = False,
    dtype: str = "auto",
    gguf_type: str = "f16",
) -> dict[str, Any]:
    from tuneforge.engine.transformers import Engine, Settings

    adapter = run.sub("adapter")
    if not (adapter / "adapter_config.json").exists():
        if (run.sub("merged") / "config.json").exists() and experiment.train.full_finetune:
            raise TuneforgeError(
                f"this run fine-tuned every weight: {run.sub('merged')} already holds the full model, "
                "and every verb uses it as `finetuned`; there is no adapter to merge"
            )
        raise TuneforgeError(f"no adapter in {adapter}; run `tuneforge train` first")
    tools = find_tools(gguf_type) if gguf else None  # before minutes of merging, not after
    from tuneforge.models import materialize, resolve

    if dtype != "auto":
        experiment = experiment.model_copy(update={"model": experiment.model.model_copy(update={"dtype": dtype})})
    width = 2 if dtype in ("auto", "bfloat16", "float16") else 4
    if merge_device(materialize(resolve(experiment.model.ref)), width) == "cpu":
        cpu_dtype = "bfloat16" if dtype == "auto" else dtype
        print(
            f"the GPU cannot hold the {8 * width}-bit base beside the merge: "
            f"merging on the CPU in {cpu_dtype} (slower, same result)",
            flush=True,
        )
        experiment = experiment.model_copy(
            update={"model": experiment.model.model_copy(update={"device": "cpu", "dtype": cpu_dtype})}
        )
    # the base de-quantized, in the device's full precision, with the adapter on top
    with_adapter = Engine.load(experiment, "adapter", adapter=str(adapter), quantization="none")
    tokenizer = with_adapter.tokenizer
    prompts = probe_prompts(run)
    settings = Settings(max_new_tokens=max_new_tokens)
    before = with_adapter.generate(prompts, settings)

    merged_model = with_adapter.model.merge_and_unload()
    dtype = str(merged_model.dtype).removeprefix("torch.")
    target = run.sub("merged")
    with atomic_dir(target) as tmp:
        merged_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.copy(adapter / "chat_template.jinja", tmp / "chat_template.jinja")
        for name in ("generation_config.json", "tuneforge.json"):  # tuneforge.json: the training system prompt
            if (adapter / name).exists():
                shutil.copy(adapter / name, tmp / name)
    del merged_model, with_adapter

    after = Engine.load(experiment, "merged", merged=str(target), quantization="none").generate(prompts, settings)
    mismatches = [
        {"prompt": p[-1]["content"], "adapter": a.text, "merged": m.text}
        for p, a, m in zip(prompts, before, after)
        if a.text != m.text
    ]
    report: dict[str, Any] = {"merged": str(target), "dtype": dtype, "probes": len(prompts), "mismatches": mismatches}
    failure = None
    if tools is not None:
        try:
            report["gguf"] = _export_gguf(
                experiment, run, tokenizer, tools, gguf_type, (prompts, after, settings, dtype)
            )
        except TuneforgeError as exc:
            report["gguf_error"] = failure = str(exc)
    atomic_write_json(run.sub("merge_report.json"), report)  # the merge and its probes are kept whatever GGUF did
    run.record("merge", {**report, "mismatches": len(mismatches)})
    if failure:
        raise TuneforgeError(f"{failure}; the merged safetensors model and merge_report.json are saved")
    return report


def _export_gguf(experiment: Experiment, run: RunDir, tokenizer, tools: Tools, gguf_type: str, probe) -> dict:
    """The merged folder as a GGUF with the trained template and stop token, its Modelfile, and the probe set
    answered from the file: every answer that differs from the merged model's is listed in `drift`."""
    from tuneforge.systems import training_system_prompt

    prompts, merged_answers, settings, dtype = probe
    target = run.sub(f"merged-{gguf_type}.gguf")
    trained_with = trained(tokenizer, training_system_prompt(run))
    try:
        entry = export(run.sub("merged"), target, tools, trained_with, gguf_type, name=experiment.name)
    except (ValueError, OSError) as exc:  # a file the gguf package cannot read or rewrite
        raise TuneforgeError(f"GGUF export to {target}: {exc}") from None
    start = time.perf_counter()
    try:
        answers = gguf_answers(target, prompts, settings, dtype=dtype)
    except (ValueError, KeyError, OSError, NotImplementedError) as exc:  # an architecture transformers cannot read
        entry["probe_error"] = f"the probe set was not answered from the GGUF: {exc}"
        return entry
    entry["probe_seconds"] = round(time.perf_counter() - start, 1)
    entry["drift"] = [
        {"prompt": p[-1]["content"], "merged": m.text, "gguf": g.text}
        for p, m, g in zip(prompts, merged_answers, answers)
        if m.text != g.text
    ]
    return entry


def parameter_count(location: str) -> int:
    """Parameters of a safetensors model folder, from the files' headers (no weights are read)."""
    from safetensors import safe_open

    total = 0
    for path in Path(location).glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                count = 1
                for dim in fh.get_slice(name).get_shape():
                    count *= dim
                total += count
    return total


def merge_device(location: str, width: int = 2, headroom: float = 1.25) -> str | None:
    """'cpu' where a CUDA GPU is present but its free memory cannot hold the base at `width` bytes a weight with
    room to merge (an 8B model is 16 GB in 16 bits: all of a T4); None to merge where the model would load anyway."""
    import torch

    if not torch.cuda.is_available():
        return None
    params = parameter_count(location)
    free, _ = torch.cuda.mem_get_info()
    return "cpu" if params and width * params * headroom > free else None
