"""GGUF export: the tools are looked for before merging, a failed conversion keeps the merge and its report, the
GGUF's metadata is checked against the run (template, end-of-turn, BOS) and rewritten when it differs, the chat
template is translated to Ollama's Go syntax, and drift between the GGUF's answers and the merged model's fails."""

from __future__ import annotations

import json
import os
import sys
import tarfile

import pytest

from tests.conftest import CHATML, make_tokenizer
from tuneforge import gguf_export
from tuneforge import merge as merging
from tuneforge.errors import TuneforgeError
from tuneforge.gguf_export import Tools, chat_layout, convert, find_tools, go_template, metadata_fixes, trained

SMOLLM2 = (  # the builtin's template: ChatML with a default system turn when the conversation opens without one
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
ALPACA = (  # roles written differently: no role name in the text
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
    "{% else %}{{ '### Response:\n' + m['content'] + '<|im_end|>\n\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)
GEMMA = (  # no system role: the system prompt is folded into the first user turn
    "{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{{ '<start_of_turn>' + m['role'] + '\\n' + (first if loop.first else '') + m['content'] }}"
    "{{ '<end_of_turn>\\n' }}{% endfor %}"
)
INSTRUCTED = CHATML.replace(  # an assistant opening that depends on the conversation
    "{{ '<|im_start|>assistant\n' }}",
    "{{ '<|im_start|>assistant' + (' (instructed)' if messages[0]['role'] == 'system' else '') + '\\n' }}",
)
RAISES = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
RAISES += "{% endif %}{{ m['content'] }}{% endfor %}"


def _trained(template: str, system: str | None = None, **kwargs):
    return trained(make_tokenizer(template, **kwargs), system)


def test_chatml_becomes_ollamas_chatml_template():
    layout = chat_layout(_trained(CHATML).render, "<|im_start|>")
    assert go_template(layout, keep_bos=False) == (
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )


def test_the_builtins_default_system_turn_is_kept_for_conversations_without_one():
    run = _trained(SMOLLM2)
    assert (run.end_of_turn, run.bos) == ("<|im_end|>", "<|im_start|>")  # its BOS opens every turn: not a lead BOS
    template = go_template(chat_layout(run.render, run.bos), keep_bos=False)
    assert template == (
        '{{ if .Messages }}{{ if ne (index .Messages 0).Role "system" }}<|im_start|>system\n'
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n{{ end }}{{ end }}"
        "{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )


def test_a_leading_bos_is_left_to_the_gguf_where_it_adds_one():
    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    run = _trained(LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", specials=specials)
    assert run.end_of_turn == "<|eot_id|>"
    layout = chat_layout(run.render, run.bos)
    body = (
        "{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert go_template(layout, keep_bos=False) == body
    assert go_template(layout, keep_bos=True) == "<|begin_of_text|>" + body


def test_roles_written_differently_get_one_branch_each():
    template = go_template(chat_layout(_trained(ALPACA).render), keep_bos=False)
    assert template == (
        '{{ range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
        '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}### Response:\n{{ .Content }}<|im_end|>\n\n{{ end }}{{ end }}'
        "### Response:\n"
    )


@pytest.mark.parametrize(
    ("template", "why"),
    [
        (GEMMA, "does not write each message's content once"),
        (RAISES, "System role not supported"),
        (INSTRUCTED, r"renders \[user\] in a way role blocks cannot reproduce"),
    ],
)
def test_a_template_that_is_not_role_blocks_is_refused_with_why(template, why):
    tokenizer = make_tokenizer(template)
    with pytest.raises(ValueError, match=why):
        chat_layout(
            lambda m, generation: tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=generation)
        )


def test_go_template_braces_in_literal_text_are_quoted():
    layout = chat_layout(_trained(CHATML.replace("assistant\n", "assistant {{x}}\n")).render)
    assert '<|im_start|>assistant {{ "{{" }}x}}\n' in go_template(layout, keep_bos=False)


GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct{ Role, Content string }

func main() {
	var in struct {
		Template string
		Cases    [][]Message
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("t").Parse(in.Template))
	out := []string{}
	for _, messages := range in.Cases {
		var text strings.Builder
		if err := tmpl.Execute(&text, struct{ Messages []Message }{messages}); err != nil {
			panic(err)
		}
		out = append(out, text.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Go's text/template, which Ollama renders a Modelfile's TEMPLATE with (skipped where Go is not installed)."""
    import shutil
    import subprocess

    if shutil.which("go") is None:
        pytest.skip("needs a Go toolchain (Debian: apt-get install golang-go) to render Go templates")
    folder = tmp_path_factory.mktemp("gorender")
    (folder / "main.go").write_text(GO_RENDER)
    (folder / "go.mod").write_text("module gorender\ngo 1.19\n")
    env = {**os.environ, "GOFLAGS": "-mod=mod", "GOPROXY": "off"}
    subprocess.run(["go", "build", "-o", "render", "."], cwd=folder, env=env, check=True, capture_output=True)

    def render(template: str, cases: list[list[dict]]) -> list[str]:
        cases = [[{"Role": m["role"], "Content": m["content"]} for m in c] for c in cases]
        data = json.dumps({"Template": template, "Cases": cases})
        result = subprocess.run([str(folder / "render")], input=data, capture_output=True, text=True, check=True)
        return json.loads(result.stdout)

    return render


@pytest.mark.parametrize("name", ["chatml", "smollm2", "llama3", "alpaca"])
def test_the_go_template_renders_in_go_as_the_jinja_one_does(name, go_render):
    """Rendered by Go as Ollama does, with the Modelfile's SYSTEM put first where a conversation has no system
    message (Ollama's rule), the prompt is the Jinja template's text, less a BOS the GGUF adds itself."""
    specials = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    tokenizers = {
        "chatml": lambda: make_tokenizer(CHATML),
        "smollm2": lambda: make_tokenizer(SMOLLM2),
        "llama3": lambda: make_tokenizer(LLAMA3, bos="<|begin_of_text|>", eos="<|eot_id|>", specials=specials),
        "alpaca": lambda: make_tokenizer(ALPACA),
    }
    run = trained(tokenizers[name](), "Be brief.")
    layout = chat_layout(run.render, run.bos)
    conversations = [
        [{"role": "user", "content": "Hi there"}],
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b\nc"},
            {"role": "user", "content": "{{x}}"},
        ],
    ]
    system = {"role": "system", "content": "Be brief."}
    conversations += [[system, *c] for c in conversations if c[0]["role"] != "system"]
    for keep_bos in (True, False):
        rendered = go_render(go_template(layout, keep_bos), conversations)
        jinja = [run.render(c, True) for c in conversations]
        assert rendered == [text if keep_bos else text.removeprefix(layout.bos) for text in jinja]


def test_modelfile_names_the_file_template_stop_and_system_prompt():
    text = gguf_export.modelfile("merged-f16.gguf", "T", "<|im_end|>", "Answer in French.")
    assert text.splitlines()[1:] == [
        "FROM ./merged-f16.gguf",
        'TEMPLATE """T"""',
        'PARAMETER stop "<|im_end|>"',
        'SYSTEM """Answer in French."""',
    ]
    assert "SYSTEM" not in gguf_export.modelfile("m.gguf", "T", "</s>", None)
    with pytest.raises(ValueError, match="cannot quote"):
        gguf_export.modelfile("m.gguf", "T", "</s>", 'say """hi"""')


def _tiny_gguf(path, template="{{ wrong }}", eos=0, add_bos=True):
    """A small GGUF as a converter might write it: metadata, a vocabulary array, f32, f16 and q8_0 tensors."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny")
    writer.add_block_count(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "hi"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(template)
    rng = np.random.default_rng(0)
    writer.add_tensor("a.weight", rng.standard_normal((4, 32)).astype(np.float32))
    writer.add_tensor("b.weight", rng.standard_normal((3, 64)).astype(np.float16))
    q8 = quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tensors(path):
    from gguf import GGUFReader

    return {t.name: (int(t.tensor_type), t.data.tobytes()) for t in GGUFReader(path).tensors}


def test_metadata_that_differs_from_the_run_is_found_and_rewritten(tmp_path):
    """The template, eos (and eot) and a BOS the template never writes: what makes a GGUF answer gibberish or never
    stop in llama.cpp and Ollama. Rewritten, the rest of the metadata and every tensor's bytes are unchanged."""
    from gguf import GGUFReader

    path = _tiny_gguf(tmp_path / "m.gguf")
    before = _tensors(path)
    metadata = gguf_export.read_metadata(path)
    fixes = metadata_fixes(metadata, CHATML, 2, writes_bos=False)
    assert fixes == {
        "tokenizer.chat_template": CHATML,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    gguf_export.rewrite_metadata(path, fixes)
    after = gguf_export.read_metadata(path)
    assert {k: after[k] for k in fixes} == fixes
    assert {k: v for k, v in after.items() if k not in fixes} == {k: v for k, v in metadata.items() if k not in fixes}
    assert GGUFReader(path).fields["tokenizer.ggml.tokens"].contents() == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "hi",
    ]
    assert _tensors(path) == before
    assert metadata_fixes(after, CHATML, 2, writes_bos=False) == {}


def test_metadata_the_converter_got_right_is_left_alone(tmp_path):
    metadata = gguf_export.read_metadata(_tiny_gguf(tmp_path / "m.gguf", CHATML, eos=2, add_bos=False))
    assert metadata_fixes(metadata, CHATML, 2, writes_bos=False) == {}
    assert metadata_fixes({**metadata, "tokenizer.ggml.add_bos_token": True}, CHATML, 2, writes_bos=True) == {}
    assert metadata_fixes({**metadata, "tokenizer.ggml.eot_token_id": 5}, CHATML, 2, False) == {
        "tokenizer.ggml.eot_token_id": 2
    }


def test_missing_converter_names_the_command_that_fetches_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    with pytest.raises(TuneforgeError, match="python -m tuneforge.gguf_export --fetch.*nothing was merged"):
        find_tools()


def _sdist(tmp_path):
    """A llama-cpp-python source archive in miniature: what the converter needs, and what it does not."""
    root = tmp_path / "sdist" / "llama_cpp_python-9.9.9"
    files = {
        "vendor/llama.cpp/convert_hf_to_gguf.py": "import sys\nprint(sys.argv)\n",
        "vendor/llama.cpp/conversion/__init__.py": "",
        "vendor/llama.cpp/gguf-py/gguf/__init__.py": "",
        "vendor/llama.cpp/gguf-py/tests/test_x.py": "",
        "vendor/llama.cpp/src/llama.cpp": "",
        "llama_cpp/__init__.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    archive = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return archive


def test_fetch_keeps_the_converter_from_a_source_archive_where_merge_finds_it(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
    assert gguf_export.main(["--fetch", "--sdist", str(_sdist(tmp_path))]) == 0
    home = tmp_path / "home" / "llama.cpp"
    kept = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())
    assert kept == ["SOURCE", "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]
    assert find_tools("q8_0") == Tools(str(home / "convert_hf_to_gguf.py"), None)


def _script(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!{sys.executable}\n" + text)  # PATH may be emptied by the test
    path.chmod(0o755)
    return path


# the converter's arguments, written where --outfile says
ECHO = "import json, sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'w').write(json.dumps(sys.argv[1:]))\n"


def test_the_converter_is_run_with_the_type_and_the_runs_name(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(_script(tmp_path / "llama.cpp" / "convert_hf_to_gguf.py", ECHO).parent))
    convert(tmp_path / "merged", tmp_path / "out.gguf", find_tools("q8_0"), "q8_0", name="run")
    args = json.loads((tmp_path / "out.gguf").read_text())
    assert args[0] == str(tmp_path / "merged") and args[args.index("--outtype") + 1] == "q8_0"
    assert args[args.index("--model-name") + 1] == "run"


def test_k_quants_need_llama_quantize_and_go_through_an_f16_file(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_DIR", str(_script(tmp_path / "llama.cpp" / "convert_hf_to_gguf.py", ECHO).parent))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(TuneforgeError, match="--gguf-type q4_k_m needs llama.cpp's llama-quantize"):
        find_tools("q4_k_m")
    quantize = "import sys\nopen(sys.argv[2], 'w').write(open(sys.argv[1]).read() + ' ' + sys.argv[3])\n"
    _script(tmp_path / "bin" / "llama-quantize", quantize)
    convert(tmp_path / "merged", tmp_path / "out.gguf", find_tools("q4_k_m"), "q4_k_m")
    text = (tmp_path / "out.gguf").read_text()
    assert text.endswith(" Q4_K_M") and '"--outtype", "f16"' in text
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == ["out.gguf"]  # the f16 file is gone


@pytest.fixture()
def trained_run(tmp_path, tiny_llama, tiny_tokenizer, tiny_model_dir, monkeypatch):
    """A run with a LoRA adapter on the tiny Llama (its base too, so no builtin is converted), and Engine.load serving
    the tiny model."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.config import load_experiment
    from tuneforge.engine.transformers import Engine
    from tuneforge.run import RunDir

    path = tmp_path / "exp.yaml"
    path.write_text(f"name: m\nmodel: {{ref: {tiny_model_dir}}}\ndata: {{train: x.jsonl}}\n")
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
    monkeypatch.setenv("TUNEFORGE_HOME", str(tmp_path / "home"))
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


def test_the_gguf_gets_the_runs_metadata_a_modelfile_and_its_drift_reported(trained_run, tmp_path, monkeypatch):
    """The converter's file (here: a stand-in with a foreign template, eos and BOS) is fixed to what the run trained
    with, the Modelfile is written beside it, and every probe answer the GGUF gives differently is listed."""
    experiment, run, loads = trained_run
    (run.sub("adapter") / "tuneforge.json").write_text(json.dumps({"system_prompt": "Be brief."}))
    monkeypatch.setenv("LLAMA_CPP_DIR", str(_script(tmp_path / "llama.cpp" / "convert_hf_to_gguf.py", ECHO).parent))
    monkeypatch.setattr(gguf_export, "convert", lambda folder, target, *args, **kwargs: _tiny_gguf(target))
    asked = []

    def answers(path, prompts, settings, dtype):
        from tuneforge.engine.transformers import Engine

        asked.append(gguf_export.read_metadata(path))
        merged = Engine.load(experiment, "merged", merged=str(run.sub("merged"))).generate(prompts, settings)
        merged[1].text += " and more"
        return merged

    monkeypatch.setattr(merging, "gguf_answers", answers)
    report = merging.merge(experiment, run, max_new_tokens=4, gguf=True, gguf_type="q8_0")
    entry = report["gguf"]
    assert entry["file"] == str(run.sub("merged-q8_0.gguf")) and entry["type"] == "q8_0"
    assert entry["metadata_fixed"] == sorted(
        [
            "tokenizer.chat_template",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.add_bos_token",
        ]
    )
    assert asked[0]["tokenizer.chat_template"] == CHATML and asked[0]["tokenizer.ggml.eos_token_id"] == 2
    modelfile = run.sub("Modelfile").read_text()
    assert "FROM ./merged-q8_0.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """Be brief."""' in modelfile and "{{ range .Messages }}<|im_start|>{{ .Role }}" in modelfile
    assert [d["prompt"] for d in entry["drift"]] == [merging.probe_prompts(run)[1][-1]["content"]]
    assert entry["drift"][0]["gguf"] == entry["drift"][0]["merged"] + " and more"
    assert json.loads(run.sub("merge_report.json").read_text())["gguf"]["drift"] == entry["drift"]


def test_cli_exits_1_when_the_gguf_answers_differently(tmp_path, monkeypatch, capsys):
    from tuneforge import cli

    calls = []
    drift = [{"prompt": "Capital?", "merged": "Paris.", "gguf": "Paris, France."}]
    gguf = {"file": "m.gguf", "type": "q8_0", "bytes": 2**20, "seconds": 1.0, "metadata_fixed": [], "modelfile": "M"}

    def merge(experiment, run, **kwargs):
        calls.append(kwargs)
        return {"merged": "m", "dtype": "float32", "probes": 4, "mismatches": [], "gguf": {**gguf, "drift": drift}}

    monkeypatch.setattr(merging, "merge", merge)
    (tmp_path / "exp.yaml").write_text("name: m\ndata: {train: x.jsonl}\n")
    args = ["merge", str(tmp_path / "exp.yaml"), "--run-dir", str(tmp_path / "run")]
    assert cli.main([*args, "--gguf-type", "q8_0"]) == 1
    assert calls[0]["gguf"] and calls[0]["gguf_type"] == "q8_0"
    out = capsys.readouterr().out
    assert "1 of 4 probe answers differ between the merged model and the GGUF" in out and "'Paris, France.'" in out
    assert out.index("between the adapter and the merged model") < out.index("GGUF written to m.gguf (q8_0, 1 MiB")
    drift.clear()
    assert cli.main([*args, "--gguf"]) == 0 and calls[1]["gguf_type"] == "f16"
    assert "all 4 probe answers agree between the merged model and the GGUF" in capsys.readouterr().out
    assert cli.main(args) == 0 and not calls[2]["gguf"]


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
