"""GGUF export says how to get llama.cpp's converter when it is missing."""

from __future__ import annotations

import pytest

from tuneforge.errors import TuneforgeError
from tuneforge.infer.merge import export_gguf


def test_missing_converter_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TuneforgeError, match="LLAMA_CPP_DIR.*merged safetensors model is already saved"):
        export_gguf(tmp_path / "merged", tmp_path / "out.gguf")


def test_converter_from_llama_cpp_dir_is_run(tmp_path, monkeypatch):
    converter = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"
    converter.parent.mkdir()
    converter.write_text("import sys\nopen(sys.argv[sys.argv.index('--outfile') + 1], 'w').write(sys.argv[1])\n")
    monkeypatch.setenv("LLAMA_CPP_DIR", str(converter.parent))
    out = export_gguf(tmp_path / "merged", tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_text() == str(tmp_path / "merged") and out.endswith("out.gguf")
