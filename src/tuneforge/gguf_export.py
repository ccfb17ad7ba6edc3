"""GGUF export for `tuneforge merge --gguf`: a file that answers in llama.cpp and Ollama as the merged model does.

The merged folder goes through llama.cpp's own `convert_hf_to_gguf.py` (from `LLAMA_CPP_DIR`, `PATH`, or the copy
`python -m tuneforge.gguf_export --fetch` keeps in tuneforge's cache home, taken once from llama-cpp-python's source
distribution on PyPI), at f32, f16, bf16 or q8_0; the k-quants go on through `llama-quantize` where one is found.

Most "fine in Python, gibberish or endless in Ollama" reports are metadata, not weights, so the file is then read
back and checked against the run: its `tokenizer.chat_template` must be the template the run trained with, its
end-of-sequence (and end-of-turn) token the template's end-of-turn token, and it must not ask for a
beginning-of-sequence token the template never writes (training tokenized the rendered text as it is). A file that
differs is rewritten with the `gguf` package. An Ollama `Modelfile` is written beside it: `FROM`, the template
translated to Go's template syntax (checked by rendering both ways), `PARAMETER stop` and the run's training system
prompt. Finally the probe set is answered from the GGUF itself (its weights, tokenizer, template and stop tokens,
read back by transformers) and compared with the merged model's answers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.atomic import atomic_dir, atomic_path, atomic_write_text
from tuneforge.errors import TuneforgeError
from tuneforge.home import cache_home

SDIST_VERSION = "0.3.36"  # llama-cpp-python's source distribution: vendor/llama.cpp carries the converter
FETCH_COMMAND = "python -m tuneforge.gguf_export --fetch"
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")  # written by the converter itself
QUANTIZE_TYPES = ("q6_k", "q5_k_m", "q5_k_s", "q5_0", "q4_k_m", "q4_k_s", "q4_0", "q3_k_m", "q2_k")  # llama-quantize
GGUF_TYPES = CONVERTER_TYPES + QUANTIZE_TYPES
# what the converter needs of vendor/llama.cpp: the script, its model classes and the gguf-py it puts on its path
KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/", "gguf-py/pyproject.toml", "LICENSE")


@dataclass
class Tools:
    converter: str
    quantize: str | None = None


def converter_home() -> Path:
    """Where `--fetch` keeps llama.cpp's converter (with its model classes and gguf-py)."""
    return cache_home() / "llama.cpp"


def find_tools(gguf_type: str = "f16") -> Tools:
    """The converter (and llama-quantize for the k-quants), looked for before anything is merged: LLAMA_CPP_DIR,
    then PATH, then the fetched copy. Missing: an error naming the command that gets it."""
    if gguf_type not in GGUF_TYPES:
        raise TuneforgeError(f"--gguf-type {gguf_type}: expected one of {', '.join(GGUF_TYPES)}")
    home = os.environ.get("LLAMA_CPP_DIR")
    candidates = [Path(home) / "convert_hf_to_gguf.py"] if home else []
    candidates += [Path(p) for p in map(shutil.which, ("convert_hf_to_gguf.py", "convert-hf-to-gguf.py")) if p]
    candidates.append(converter_home() / "convert_hf_to_gguf.py")
    script = next((c for c in candidates if c.is_file()), None)
    if script is None:
        raise TuneforgeError(
            "merge --gguf needs llama.cpp's convert_hf_to_gguf.py and found none in LLAMA_CPP_DIR, on PATH or in "
            f"{converter_home()}: get it once with `{FETCH_COMMAND}` (llama-cpp-python {SDIST_VERSION}'s source "
            "from PyPI; `--sdist FILE` takes one already downloaded), or set LLAMA_CPP_DIR to a llama.cpp checkout; "
            "nothing was merged (drop --gguf for safetensors only)"
        )
    _check_converter_needs()
    quantize = None
    if gguf_type in QUANTIZE_TYPES:
        places = [shutil.which("llama-quantize")]
        if home:
            places += [str(Path(home) / "llama-quantize"), str(Path(home) / "build" / "bin" / "llama-quantize")]
        quantize = next((p for p in places if p and os.access(p, os.X_OK)), None)
        if quantize is None:
            raise TuneforgeError(
                f"--gguf-type {gguf_type} needs llama.cpp's llama-quantize on PATH (or in LLAMA_CPP_DIR/build/bin), "
                f"and found none; {', '.join(CONVERTER_TYPES)} need only the converter; nothing was merged"
            )
    return Tools(str(script), quantize)


def _check_converter_needs() -> None:
    """The converter imports sentencepiece for every Llama-family vocabulary, even one without a sentencepiece
    model; without it the conversion would fail after the merge."""
    import importlib.util

    if importlib.util.find_spec("sentencepiece") is None:
        raise TuneforgeError(
            "llama.cpp's converter needs sentencepiece in this Python: pip install 'tuneforge[gguf]'; "
            "nothing was merged"
        )


def extract_converter(archive: Path, target: Path) -> Path:
    """The converter's files from a llama-cpp-python source archive, kept in `target` (replaced as a whole)."""
    with tarfile.open(archive) as tar, atomic_dir(target) as tmp:
        found = False
        for member in tar.getmembers():
            _, sep, inside = member.name.partition("/vendor/llama.cpp/")
            if not sep or not member.isfile() or ".." in Path(inside).parts or not inside.startswith(KEEP):
                continue
            path = tmp / inside
            path.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:
                path.write_bytes(src.read())
            found = found or inside == "convert_hf_to_gguf.py"
        if not found:
            raise TuneforgeError(f"{archive} carries no vendor/llama.cpp/convert_hf_to_gguf.py")
        (tmp / "SOURCE").write_text(f"{archive.name}\n", encoding="utf-8")
    return target / "convert_hf_to_gguf.py"


def fetch_converter(sdist: Path | None = None) -> Path:
    """Download llama-cpp-python's source (pip, no build) unless given, and keep its converter in converter_home()."""
    if sdist is not None:
        return extract_converter(sdist, converter_home())
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*command, f"llama-cpp-python=={SDIST_VERSION}", "-d", tmp], check=True)
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        return extract_converter(archive, converter_home())


def _tail(result: subprocess.CompletedProcess) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else "no output"


def convert(folder: Path, target: Path, tools: Tools, gguf_type: str = "f16", name: str | None = None) -> None:
    """The merged folder as one GGUF file of `gguf_type` (through an f16 file and llama-quantize for k-quants)."""
    outtype = gguf_type if gguf_type in CONVERTER_TYPES else "f16"
    with atomic_path(target) as out:
        command = [sys.executable, tools.converter, str(folder), "--outfile", str(out), "--outtype", outtype]
        result = subprocess.run(command + (["--model-name", name] if name else []), capture_output=True, text=True)
        if result.returncode:
            raise TuneforgeError(f"llama.cpp's converter failed (exit {result.returncode}): {_tail(result)}")
        if outtype != gguf_type:
            f16 = out.with_name(out.name + ".f16")
            try:
                os.replace(out, f16)
                result = subprocess.run(
                    [tools.quantize, str(f16), str(out), gguf_type.upper()], capture_output=True, text=True
                )
            finally:
                f16.unlink(missing_ok=True)  # only the quantized file is kept
            if result.returncode:
                raise TuneforgeError(f"llama-quantize failed (exit {result.returncode}): {_tail(result)}")


# --- metadata: the trained template, its end-of-turn token, no BOS the training never saw -------------------------

TEMPLATE_KEY = "tokenizer.chat_template"
EOS_KEY = "tokenizer.ggml.eos_token_id"
EOT_KEY = "tokenizer.ggml.eot_token_id"
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"


def read_metadata(path: Path) -> dict[str, Any]:
    """The GGUF's key/value metadata (arrays such as the vocabulary left out)."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(path)
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and field.types and field.types[0] != GGUFValueType.ARRAY
    }


def metadata_fixes(metadata: dict[str, Any], template: str, end_of_turn_id: int, writes_bos: bool) -> dict[str, Any]:
    """The keys whose value differs from what the run trained with, and the value each must have."""
    fixes: dict[str, Any] = {}
    if metadata.get(TEMPLATE_KEY) != template:
        fixes[TEMPLATE_KEY] = template
    # runtimes stop at eos (and eot): at the turn's end, or, unless they know the end token by its name, never
    if metadata.get(EOS_KEY) != end_of_turn_id:
        fixes[EOS_KEY] = end_of_turn_id
    if metadata.get(EOT_KEY, end_of_turn_id) != end_of_turn_id or EOS_KEY in fixes:
        fixes[EOT_KEY] = end_of_turn_id
    if metadata.get(ADD_BOS_KEY) and not writes_bos:  # a BOS in front of every prompt that training never had
        fixes[ADD_BOS_KEY] = False
    return fixes


def rewrite_metadata(path: Path, fixes: dict[str, Any]) -> None:
    """Copy the GGUF with the fixed keys (added where missing); tensors are copied byte for byte."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    types = {TEMPLATE_KEY: GGUFValueType.STRING, ADD_BOS_KEY: GGUFValueType.BOOL}
    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    with atomic_path(path) as tmp:
        writer = GGUFWriter(tmp, arch)
        for key, item in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":
                continue
            if key in fixes:
                writer.add_key_value(key, fixes[key], item.types[0])
                continue
            sub_type = item.types[-1] if item.types[0] == GGUFValueType.ARRAY else None
            writer.add_key_value(key, item.contents(), item.types[0], sub_type=sub_type)
            if key == "general.alignment":
                writer.data_alignment = item.contents()
        for key in [k for k in fixes if k not in reader.fields]:
            writer.add_key_value(key, fixes[key], types.get(key, GGUFValueType.UINT32))
        for tensor in reader.tensors:
            writer.add_tensor_info(
                tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            writer.write_tensor_data(tensor.data)
        writer.close()
    del reader


# --- the chat template in Ollama's Go template syntax -------------------------------------------------------------

ROLES = ("system", "user", "assistant")
Render = Callable[[list[dict], bool], str]


@dataclass
class Layout:
    """A chat template that writes each message as its role's opening, the content and its role's closing:
    `bos`, then `head` when the conversation opens with no system message, the messages, and `generation` for the
    assistant's turn to come."""

    pre: dict[str, str]
    post: dict[str, str]
    generation: str
    head: str = ""
    bos: str = ""

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        text = self.bos + ("" if messages and messages[0]["role"] == "system" else self.head)
        text += "".join(self.pre[m["role"]] + m["content"] + self.post[m["role"]] for m in messages)
        return text + (self.generation if add_generation_prompt else "")


def _between(text: str, marks: list[str]) -> list[str]:
    """The text before, between and after `marks`, each found once and in order."""
    pieces, at = [], 0
    for mark in marks:
        found = text.find(mark, at)
        if found < 0 or text.count(mark) != 1:
            raise ValueError(f"the template does not write each message's content once ({mark!r})")
        pieces.append(text[at:found])
        at = found + len(mark)
    return pieces + [text[at:]]


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    if not (text.startswith(prefix) and text.endswith(suffix)) or len(prefix) + len(suffix) > len(text):
        raise ValueError(f"{text!r} is not {prefix!r} + ... + {suffix!r}")
    return text[len(prefix) : len(text) - len(suffix)]


def _refusing(render: Render) -> Render:
    """`render`, with a template's own refusal (raise_exception: "System role not supported") as a ValueError."""

    def rendered(messages: list[dict], generation: bool) -> str:
        try:
            return render(messages, generation)
        except Exception as exc:  # jinja2's TemplateError and whatever the template raises
            roles = ", ".join(m["role"] for m in messages)
            raise ValueError(f"it refuses a conversation of [{roles}]: {exc}") from None

    return rendered


def chat_layout(render: Render, bos: str | None = None) -> Layout:
    """The template's layout read from what it renders for marked messages, then checked by rendering other
    conversations both ways; ValueError saying why when the template does not fit (it rewrites contents, merges
    the system prompt into a user turn, refuses a role...)."""
    render = _refusing(render)
    s, u, a, u2 = "SYSTEM_7Q3", "USER_4K8", "ASSISTANT_9Z2", "USER_2P6"
    sm, um, am, um2 = (
        {"role": r, "content": c} for r, c in zip(("system", "user", "assistant", "user"), (s, u, a, u2))
    )
    before_s, s_u, u_a, a_u, tail = _between(render([sm, um, am, um2], True), [s, u, a, u2])
    post = {"system": _between(render([sm], False), [s])[1], "user": _between(render([sm, um], False), [s, u])[2]}
    post["assistant"] = _between(render([sm, um, am], False), [s, u, a])[3]
    pre = {"user": _strip(s_u, post["system"]), "assistant": _strip(u_a, post["user"])}
    if a_u != post["assistant"] + pre["user"]:
        raise ValueError("a user turn after an assistant turn opens differently from the first one")
    # a BOS written first, not the opening of every turn as well (SmolLM2's BOS is ChatML's <|im_start|>)
    lead = bos if bos and before_s.startswith(bos) and not pre["user"].startswith(bos) else ""
    pre["system"] = _strip(before_s, lead)
    head = _strip(_between(render([um], False), [u])[0], lead, pre["user"])
    layout = Layout(pre, post, _strip(tail, post["user"]), head, lead)
    checks = [[um], [sm, um], [um, am, um2], [sm, um, am, um2, am], [sm, um, am], [um, am]]
    for messages in checks:
        for generation in (True, False):
            if layout.render(messages, generation) != render(messages, generation):
                roles = ", ".join(m["role"] for m in messages)
                raise ValueError(f"the template renders [{roles}] in a way role blocks cannot reproduce")
    return layout


def _go_text(text: str) -> str:
    """Literal text in a Go template: only `{{` would start an action."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(layout: Layout, keep_bos: bool) -> str:
    """Ollama's TEMPLATE for the layout: `.Messages` in order (Ollama puts the Modelfile's SYSTEM first when a
    request has none), the head when the first message is not a system one, then the assistant's opening. The
    template's BOS is kept only where the GGUF does not add one itself."""
    text = _go_text(layout.bos) if keep_bos else ""
    if layout.head:
        text += f'{{{{ if .Messages }}}}{{{{ if ne (index .Messages 0).Role "system" }}}}{_go_text(layout.head)}'
        text += "{{ end }}{{ end }}"
    opening = layout.pre["user"].split("user")
    generic = len(opening) == 2 and len(set(layout.post.values())) == 1
    generic = generic and all(layout.pre[r] == r.join(opening) for r in ROLES)
    if generic:
        body = f"{_go_text(opening[0])}{{{{ .Role }}}}{_go_text(opening[1])}{{{{ .Content }}}}"
        body += _go_text(layout.post["user"])
    else:
        branches = [
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{_go_text(layout.pre[r])}{{{{ .Content }}}}'
            + _go_text(layout.post[r])
            for i, r in enumerate(ROLES)
        ]
        body = "".join(branches) + "{{ end }}"
    return f"{text}{{{{ range .Messages }}}}{body}{{{{ end }}}}{_go_text(layout.generation)}"


def modelfile(gguf_name: str, template: str, stop: str, system: str | None) -> str:
    """An Ollama Modelfile beside the GGUF (`ollama create NAME -f Modelfile` in that folder)."""
    for what, text in (("template", template), ("system prompt", system or "")):
        if '"""' in text:
            raise ValueError(f'the {what} holds """, which a Modelfile cannot quote')
    lines = [
        "# written by tuneforge merge --gguf; in this folder: ollama create NAME -f Modelfile",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
        f'PARAMETER stop "{stop}"',
    ]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


# --- the export: convert, check the metadata, Modelfile, probe ----------------------------------------------------


@dataclass
class Trained:
    """What the run trained with, which the GGUF must say too."""

    template: str
    end_of_turn: str
    end_of_turn_id: int
    bos: str | None
    system_prompt: str | None
    render: Render = field(repr=False)


def trained(tokenizer, system_prompt: str | None) -> Trained:
    """The run's template, end-of-turn token and BOS from its tokenizer (the template stored with the adapter)."""
    from tuneforge.data.chat import ChatEncoder

    encoder = ChatEncoder(tokenizer)
    if encoder.end_of_turn is None:
        raise TuneforgeError("the chat template writes no end-of-turn token after an answer: nothing to stop at")
    return Trained(
        template=tokenizer.chat_template,
        end_of_turn=encoder.end_of_turn,
        end_of_turn_id=encoder.end_of_turn_id,
        bos=tokenizer.bos_token,
        system_prompt=system_prompt,
        render=lambda messages, generation: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        ),
    )


def write_modelfile(target: Path, run: Trained, layout: Layout, metadata: dict[str, Any]) -> Path:
    """The Modelfile beside the GGUF; the template's BOS kept only where the GGUF does not add one itself."""
    template = go_template(layout, keep_bos=not metadata.get(ADD_BOS_KEY))
    return atomic_write_text(
        target.with_name("Modelfile"), modelfile(target.name, template, run.end_of_turn, run.system_prompt)
    )


def gguf_answers(path: Path, prompts: list[list[dict]], settings, dtype: str = "float32") -> list:
    """The probe prompts answered greedily from the GGUF alone: its weights (de-quantized by transformers), its
    tokenizer and chat template, stopping at its eos and eot tokens, as llama.cpp would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.engine.transformers import Engine

    metadata = read_metadata(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.chat_template = metadata.get(TEMPLATE_KEY)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype))
    if torch.cuda.is_available():
        model = model.to("cuda")
    engine = Engine(model, tokenizer, "gguf")
    engine.stop_ids = [i for i in dict.fromkeys((metadata.get(EOS_KEY), metadata.get(EOT_KEY))) if i is not None]
    return engine.generate(prompts, settings)


def export(
    folder: Path,
    target: Path,
    tools: Tools,
    run: Trained,
    gguf_type: str = "f16",
    name: str | None = None,
) -> dict[str, Any]:
    """Convert, check and fix the metadata, write the Modelfile; the report's `gguf` entry (probes come after)."""
    start = time.perf_counter()
    convert(folder, target, tools, gguf_type, name)
    try:
        layout, problem = chat_layout(run.render, run.bos), None
    except ValueError as exc:
        layout, problem = None, f"no Modelfile: the chat template cannot be translated to Ollama's: {exc}"
    # a BOS of its own before the first turn, not the opening of every turn (SmolLM2's BOS is <|im_start|>)
    first = run.render([{"role": "user", "content": "hi"}], True)
    lead_bos = bool(layout.bos) if layout else bool(run.bos) and first.startswith(run.bos)
    fixes = metadata_fixes(read_metadata(target), run.template, run.end_of_turn_id, lead_bos)
    if fixes:
        rewrite_metadata(target, fixes)
    modelfile_path = None
    if layout is not None:
        try:
            modelfile_path = write_modelfile(target, run, layout, read_metadata(target))
        except ValueError as exc:
            problem = f"no Modelfile: {exc}"
    return {
        "file": str(target),
        "type": gguf_type,
        "bytes": target.stat().st_size,
        "seconds": round(time.perf_counter() - start, 1),
        "metadata_fixed": sorted(fixes),
        "end_of_turn": run.end_of_turn,
        "modelfile": str(modelfile_path) if modelfile_path else None,
        **({"modelfile_error": problem} if problem else {}),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tuneforge.gguf_export", description="keep llama.cpp's GGUF converter for merge --gguf"
    )
    parser.add_argument("--fetch", action="store_true", help=f"copy it from llama-cpp-python {SDIST_VERSION}'s source")
    parser.add_argument("--sdist", type=Path, help="a llama_cpp_python-*.tar.gz already downloaded (no network)")
    args = parser.parse_args(argv)
    if not args.fetch:
        parser.print_help()
        return 2
    try:
        script = fetch_converter(args.sdist)
    except (TuneforgeError, OSError, tarfile.TarError, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"llama.cpp's converter kept in {script.parent}; `tuneforge merge FILE --gguf` finds it there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
