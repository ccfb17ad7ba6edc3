"""Fetch the real tokenizers the tests use: vocab-only GGUF files from llama-cpp-python's source distribution.

The README's test command runs this before pytest. It downloads the pinned sdist from
the package index once (pip download, no build), extracts only the vocabularies below
into tests/.vocab/, and converts each into a transformers tokenizer folder beside it
(tests/.vocab/<name>/, loaded in a fraction of a second where reading a GGUF takes up
to 17 s); it also keeps llama.cpp's GGUF converter from the same archive in
tests/.vocab/llama.cpp/ (the GGUF export test's LLAMA_CPP_DIR). A second run finds
them and does nothing.
Tests never fetch anything: without these files the tests that need them fail and say
to run this script.

    python tests/fetch_vocab.py
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
FILES = [
    "ggml-vocab-llama-spm.gguf",
    "ggml-vocab-llama-bpe.gguf",
    "ggml-vocab-qwen2.gguf",
    "ggml-vocab-phi-3.gguf",
    "ggml-vocab-gemma-4.gguf",
]
FOLDER = Path(__file__).resolve().parent / ".vocab"
CONVERTER = FOLDER / "llama.cpp"  # convert_hf_to_gguf.py with its model classes and gguf-py


def converted(name: str) -> Path:
    """The tokenizer folder converted from a GGUF vocabulary."""
    return FOLDER / Path(name).stem


def convert(name: str) -> None:
    from transformers import AutoTokenizer, GemmaTokenizer

    # AutoTokenizer stops at the Gemma GGUF's model config (per-layer head counts); its tokenizer class loads it
    loader = GemmaTokenizer if "gemma" in name else AutoTokenizer
    tokenizer = loader.from_pretrained(str(FOLDER), gguf_file=name)
    part = FOLDER / f".{Path(name).stem}.part"
    tokenizer.save_pretrained(part)
    part.replace(converted(name))


def main() -> int:
    have_converter = (CONVERTER / "convert_hf_to_gguf.py").exists()
    if have_converter and all((FOLDER / name).exists() and converted(name).exists() for name in FILES):
        return 0
    if have_converter and all((FOLDER / name).exists() for name in FILES):
        for name in FILES:
            if not converted(name).exists():
                convert(name)
        return 0
    FOLDER.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={VERSION}",
                "-d",
                tmp,
            ],
            check=True,
        )
        (archive,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in FILES and "/vendor/llama.cpp/models/" in member.name:
                    with tar.extractfile(member) as src:
                        (FOLDER / f".{name}.part").write_bytes(src.read())
                    (FOLDER / f".{name}.part").replace(FOLDER / name)
        from tuneforge.gguf_export import extract_converter

        extract_converter(archive, CONVERTER)
    missing = [name for name in FILES if not (FOLDER / name).exists()]
    if missing:
        print(f"llama-cpp-python {VERSION} did not carry {', '.join(missing)}", file=sys.stderr)
        return 1
    for name in FILES:
        if not converted(name).exists():  # the archive is fetched again when only the converter was missing
            convert(name)
    print(f"real tokenizers in {FOLDER}: {', '.join(FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
