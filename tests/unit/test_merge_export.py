"""GGUF export: the converter is looked for before merging, and a failed conversion keeps the merge and its report."""

from __future__ import annotations

import json

import pytest

from tuneforge import merge as merging
from tuneforge.errors import TuneforgeError
from tuneforge.merge import export_gguf, gguf_converter


def test_missing_converter_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TuneforgeError, match="LLAMA_CPP_DIR.*nothing was merged"):
        gguf_converter()


def test_converter_from_llama_cpp_dir_is_run(tmp_path, monkeypatch):
    converter = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"
    converter.parent.mkdir()
    converter.write_text("import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'w').write(sys.argv[1])\n")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(converter.parent))
    out = export_gguf(tmp_path / "merged", tmp_path / "out.gguf", gguf_converter())
    assert (tmp_path / "out.gguf").read_text() == str(tmp_path / "merged") and out.endswith("out.gguf")


@pytest.fixture()
def trained_run(tmp_path, tiny_llama, tiny_tokenizer, monkeypatch):
    """A run with a LoRA adapter on the tiny Llama, and Engine.load serving the tiny model instead of the builtin."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load_experiment
    from tuneforge.engine.transformers import Engine
    from tuneforge.run import RunDir

    path = tmp_path / "exp.yaml"
    path.write_text("name: m\ndata: {train: x.jsonl}\n")
    experiment = load_experiment(path)
    run = RunDir(experiment, tmp_path / "run")
    peft = get_peft_model(
        copy.deepcopy(tiny_llama), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft.save_pretrained(run.sub("adapter"))
    tiny_tokenizer.save_pretrained(run.sub("adapter"))
    loads = []

    def load(experiment, name="base", run=None, adapter=None, merged=None, quantization=None):
        loads.append(name)
        load.dtypes.append(experiment.model.dtype)
        model = peft if adapter else AutoModelForCausalLM.from_pretrained(merged)
        return Engine(model, tiny_tokenizer, name)

    load.dtypes = []
    monkeypatch.setattr(Engine, "load", staticmethod(load))
    return experiment, run, loads


def test_merge_dtype_is_the_dtype_of_both_loads(trained_run):
    """--dtype float32: the adapter-on-base model and the merged model are both loaded in it (a bfloat16 merge
    can round a short fine-tune's update away)."""
    from tuneforge.engine.transformers import Engine

    experiment, run, loads = trained_run
    merging.merge(experiment, run, max_new_tokens=4, dtype="float32")
    assert loads == ["adapter", "merged"] and Engine.load.dtypes == ["float32", "float32"]
    merging.merge(experiment, run, max_new_tokens=4)
    assert Engine.load.dtypes[2:] == ["auto", "auto"]


def test_merge_gguf_without_converter_stops_before_merging(trained_run, tmp_path, monkeypatch):
    experiment, run, loads = trained_run
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(TuneforgeError, match="convert_hf_to_gguf.py"):
        merging.merge(experiment, run, max_new_tokens=4, gguf=True)
    assert loads == [] and not run.sub("merged").exists()  # nothing was loaded or merged first


def test_a_failed_conversion_keeps_the_merge_and_its_report(trained_run, tmp_path, monkeypatch):
    experiment, run, loads = trained_run
    converter = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"
    converter.parent.mkdir()
    converter.write_text("import sys\nprint('unsupported architecture', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(converter.parent))
    with pytest.raises(TuneforgeError, match="converter failed \\(exit 3\\): unsupported architecture"):
        merging.merge(experiment, run, max_new_tokens=4, gguf=True)
    report = json.loads(run.sub("merge_report.json").read_text())
    assert report["probes"] > 0 and report["mismatches"] == [] and "unsupported architecture" in report["gguf_error"]
    assert list(run.sub("merged").glob("*.safetensors"))


def test_a_gpu_too_small_for_the_16bit_base_merges_on_the_cpu(tiny_model_dir, tiny_llama, monkeypatch):
    import torch

    from tuneforge.merge import merge_device, parameter_count

    params = sum(p.numel() for p in tiny_llama.parameters())  # a tied head counts once, as it is stored
    assert parameter_count(str(tiny_model_dir)) == params  # read from the headers, tied weights stored once
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (2 * params, 16 << 30))  # 16-bit weights alone fill it
    assert merge_device(str(tiny_model_dir)) == "cpu"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (4 * params, 16 << 30))
    assert merge_device(str(tiny_model_dir)) is None
    assert merge_device(str(tiny_model_dir), width=4) == "cpu"  # a float32 merge needs twice the room
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert merge_device(str(tiny_model_dir)) is None
