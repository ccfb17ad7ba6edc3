"""`merge --gguf` on the builtin SmolLM2 end to end, with llama.cpp's own converter (tests/.vocab/llama.cpp, kept by
tests/fetch_vocab.py from llama-cpp-python's source): the GGUF says the trained template and end-of-turn token, the
Modelfile is Ollama's ChatML with the run's system prompt, and the GGUF's greedy probe answers equal the merged
model's.

The adapter's tokenizer ends sequences with <|endoftext|>, as a base model's does, while its template ends each turn
with <|im_end|>: the converter writes that eos, and a runtime that stops where the GGUF's metadata says (transformers'
GGUF reader here) runs on into the next turn. The export rewrites it to <|im_end|>; with that fix broken on purpose 3
of the 4 answers ran on ('... Paris, France.\nsystem\n\nuser\nA snail is...') and this test failed. (llama.cpp
0.3.36 itself stopped there anyway: it takes a token spelled <|im_end|>, <|eot_id|>, <end_of_turn>... for an end of
turn by its name; a template's own end token outside that list gets no such rescue.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CONVERTER = REPO / "tests" / ".vocab" / "llama.cpp"
SYSTEM = "You are a concise assistant."


@pytest.fixture()
def trained_run(tmp_path, smollm_location):
    """A run whose adapter is a small random LoRA on the builtin (answers change, and stay text)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.config import ModelSection, load_experiment
    from tuneforge.models import load_tokenizer
    from tuneforge.run import RunDir

    if not (CONVERTER / "convert_hf_to_gguf.py").exists():
        pytest.fail(f"llama.cpp's converter is missing in {CONVERTER}: run `python tests/fetch_vocab.py` once")
    path = tmp_path / "exp.yaml"
    path.write_text("name: gguf-check\ndata: {train: x.jsonl}\n")
    experiment = load_experiment(path)
    run = RunDir(experiment, tmp_path / "run")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(smollm_location, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    adapter = run.sub("adapter")
    peft.save_pretrained(adapter)
    tokenizer = load_tokenizer(ModelSection(), smollm_location)
    tokenizer.eos_token = "<|endoftext|>"  # a base model's end of sequence, not the template's end of turn
    tokenizer.save_pretrained(adapter)
    (adapter / "chat_template.jinja").write_text(tokenizer.chat_template)
    (adapter / "tuneforge.json").write_text(json.dumps({"system_prompt": SYSTEM, "end_of_turn": "<|im_end|>"}))
    return experiment, run


def test_the_f16_gguf_answers_the_probes_as_the_merged_model_does(trained_run, monkeypatch):
    from tuneforge.gguf_export import read_metadata
    from tuneforge.merge import merge

    experiment, run = trained_run
    monkeypatch.setenv("LLAMA_CPP_DIR", str(CONVERTER))
    report = merge(experiment, run, max_new_tokens=32, gguf=True, gguf_type="f16")
    entry = report["gguf"]
    assert report["mismatches"] == [] and report["dtype"] == "float32"
    assert entry["drift"] == [], entry["drift"]  # first: without the eos fix the GGUF runs on into the next turn
    # the converter wrote the tokenizer's eos; the run stops at <|im_end|>
    assert entry["metadata_fixed"] == ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"]
    metadata = read_metadata(Path(entry["file"]))
    assert metadata["tokenizer.chat_template"] == (run.sub("adapter") / "chat_template.jinja").read_text()
    assert metadata["tokenizer.ggml.eos_token_id"] == metadata["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
    assert metadata["tokenizer.ggml.add_bos_token"] is False and metadata["general.file_type"] == 1  # f16
    assert "probe_error" not in entry and report["probes"] == 4
    assert (run.sub("Modelfile")).read_text() == (
        "# written by tuneforge merge --gguf; in this folder: ollama create NAME -f Modelfile\n"
        "FROM ./merged-f16.gguf\n"
        'TEMPLATE """{{ if .Messages }}{{ if ne (index .Messages 0).Role "system" }}<|im_start|>system\n'
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n{{ end }}{{ end }}"
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
        '"""\n'
        'PARAMETER stop "<|im_end|>"\n'
        f'SYSTEM """{SYSTEM}"""\n'
    )
