"""Model references, the device policy, and loading a local model plain and in 4-bit."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import ModelSection
from tuneforge.errors import TuneforgeError
from tuneforge.models import load_model, load_tokenizer, plan_device, resolve


def test_resolve_kinds(tmp_path, tiny_model_dir):
    assert resolve(str(tiny_model_dir)).kind == "dir"
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    with pytest.raises(TuneforgeError, match="does not exist"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(TuneforgeError, match="does not exist"):
        resolve("./no/such/dir")
    with pytest.raises(TuneforgeError, match="builtins: all-minilm-l6-v2, smollm2-135m-instruct"):
        resolve("builtin:gpt-5")


def test_builtins_resolve_to_shipped_files():
    chat = resolve("builtin:smollm2-135m-instruct")
    assert chat.kind == "gguf" and chat.location.endswith(".gguf")
    embedder = resolve("builtin:all-minilm-l6-v2")
    assert embedder.kind == "dir"


@pytest.fixture()
def fake_gpu(monkeypatch):
    """Pretend torch sees one GPU of a given compute capability."""

    def install(major: int, minor: int, name: str):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)

    return install


def test_cpu_policy():
    plan = plan_device(ModelSection(device="cpu", quantization="4bit"))
    assert (plan.device, plan.dtype, plan.attention) == ("cpu", "float32", "sdpa")
    with pytest.raises(TuneforgeError, match="flash_attention_2 needs a CUDA GPU"):
        plan_device(ModelSection(device="cpu", attention="flash_attention_2"))
    with pytest.raises(TuneforgeError, match="float16 is a GPU dtype"):
        plan_device(ModelSection(device="cpu", dtype="float16"))


def test_auto_quantization_is_4bit_on_a_gpu_and_none_on_cpu(fake_gpu):
    assert plan_device(ModelSection(device="cpu")).quantization == "none"
    assert plan_device(ModelSection(device="cpu", quantization="4bit")).quantization == "4bit"  # a value set wins
    fake_gpu(8, 0, "A100")
    assert plan_device(ModelSection()).quantization == "4bit"


def test_full_finetuning_resolves_auto_quantization_to_none():
    from tuneforge.config import Experiment

    assert Experiment(name="x", train={"full_finetune": True}).model.quantization == "none"
    with pytest.raises(Exception, match="full_finetune needs model.quantization: none"):
        Experiment(name="x", model={"quantization": "4bit"}, train={"full_finetune": True})


def test_t4_gets_fp16_and_refuses_bf16_and_flash(fake_gpu):
    fake_gpu(7, 5, "Tesla T4")
    plan = plan_device(ModelSection())
    assert (plan.device, plan.dtype, plan.attention, plan.quantization) == ("cuda", "float16", "sdpa", "4bit")
    with pytest.raises(TuneforgeError, match="bfloat16 needs an Ampere"):
        plan_device(ModelSection(dtype="bfloat16"))
    with pytest.raises(TuneforgeError, match="flash_attention_2 needs an Ampere"):
        plan_device(ModelSection(attention="flash_attention_2"))


def test_ampere_gets_bf16(fake_gpu):
    fake_gpu(8, 0, "A100")
    plan = plan_device(ModelSection())
    assert plan.dtype == "bfloat16"

    from tuneforge.models import flash_attn_problem

    assert plan.attention == ("flash_attention_2" if flash_attn_problem() is None else "sdpa")


def test_a_flash_attn_that_does_not_import_is_not_used(fake_gpu, tmp_path, monkeypatch):
    broken = tmp_path / "flash_attn"
    broken.mkdir()
    (broken / "__init__.py").write_text(
        "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c104cuda9SetDeviceEi')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "flash_attn", raising=False)
    fake_gpu(8, 0, "A100")
    assert plan_device(ModelSection()).attention == "sdpa"  # auto falls back instead of failing at model load
    with pytest.raises(TuneforgeError, match="installed but cannot be imported .*undefined symbol"):
        plan_device(ModelSection(attention="flash_attention_2"))


def test_cuda_asked_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(TuneforgeError, match="no CUDA GPU"):
        plan_device(ModelSection(device="cuda"))


def test_local_dir_loads_plain_and_in_4bit(tiny_model_dir, tiny_llama):
    ids = torch.tensor([[1, 5, 9, 2]])
    plain = load_model(ModelSection(ref=str(tiny_model_dir), quantization="none"))
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, tiny_llama(ids).logits, atol=1e-5)

    import bitsandbytes as bnb

    quantized = load_model(ModelSection(ref=str(tiny_model_dir), quantization="4bit"))
    layers = [m for m in quantized.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of the 2 layers
    with torch.no_grad():
        logits = quantized(ids).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, plain(ids).logits)  # really quantized


def _strip_template(folder):
    """The saved tokenizer without its chat template, as a base model ships."""
    (folder / "tokenizer_config.json").write_text(
        (folder / "tokenizer_config.json").read_text().replace('"chat_template"', '"unused_template"')
    )
    for extra in folder.glob("chat_template.*"):
        extra.unlink()


def test_tokenizer_needs_chat_template(tmp_path, tiny_model_dir):
    tok = load_tokenizer(ModelSection(ref=str(tiny_model_dir)))
    assert tok.pad_token is not None and tok.chat_template
    _strip_template(tiny_model_dir)
    with pytest.raises(TuneforgeError, match="no chat template .*set model.chat_template: chatml"):
        load_tokenizer(ModelSection(ref=str(tiny_model_dir)))


def test_a_base_model_trains_on_chatml_ended_by_its_own_eos(tiny_model_dir):
    from tuneforge.data.chat import ChatEncoder

    _strip_template(tiny_model_dir)
    plain = load_tokenizer(ModelSection(ref=str(tiny_model_dir), chat_template="{{ messages[0]['content'] }}"))
    tok = load_tokenizer(ModelSection(ref=str(tiny_model_dir), chat_template="chatml"))
    assert len(tok) == len(plain)  # nothing added to the vocabulary
    encoder = ChatEncoder(tok)
    assert encoder.end_of_turn == tok.eos_token and encoder.stop_ids == [tok.eos_token_id]
    chat = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "The capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    encoded = encoder.encode(chat)
    answer = [i for i, keep in zip(encoded.input_ids, encoded.supervised) if keep]
    assert tok.decode(answer) == "Paris." + tok.eos_token and not encoded.missing_eot
    prompt = tok(encoder.render(chat[:2], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert encoded.input_ids[: len(prompt)] == prompt and not any(encoded.supervised[: len(prompt)])
    assert encoder.render(chat).startswith("<|im_start|>system\nAnswer in one word.<|im_end|>\n<|im_start|>user\n")


def test_chat_template_in_jinja_replaces_the_models_own(tiny_model_dir):
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tok = load_tokenizer(ModelSection(ref=str(tiny_model_dir), chat_template=template))
    assert (
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
        == "[user] hi<|im_end|>[assistant] "
    )


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("chatlm", "is neither chatml nor a Jinja template"),
        ("{% for m in messages %}{{ m['content'] }}", "does not parse"),
    ],
)
def test_a_chat_template_that_cannot_work_is_refused_at_load(value, says):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says):
        ModelSection(chat_template=value)


@pytest.mark.parametrize("fsdp", [False, True])
def test_a_4bit_base_keeps_its_frozen_weights_in_the_compute_dtype(tiny_model_dir, monkeypatch, fsdp):
    """PEFT's prepare_model_for_kbit_training copies the embeddings, head and norms to fp32 (+2.1 GB on an 8B base);
    they stay frozen in bf16, the compute dtype. Under FSDP that is also required: it flattens a block's parameters
    into one tensor of one dtype, and the 4-bit weights are stored in bf16."""
    from tuneforge.config import Experiment
    from tuneforge.train.common import add_adapters

    if fsdp:
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    section = ModelSection(ref=str(tiny_model_dir), quantization="4bit", dtype="bfloat16", device="cpu")
    plan = plan_device(section)
    experiment = Experiment(name="x", model=section.model_dump(), train={"gradient_checkpointing": True})
    model = add_adapters(load_model(section, plan), experiment, plan)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.dtype.is_floating_point}
    assert frozen == {torch.bfloat16}
    assert model.base_model.model.is_gradient_checkpointing  # checkpointing is still on, with input gradients
    ids = torch.tensor([[1, 5, 9, 2]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)
