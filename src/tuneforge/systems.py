"""Every system a run can answer with, by name, behind one interface.

    base, finetuned               the base model; this run's adapter (or its merged/ folder)
    adapter:<dir>, merged:<dir>   any other adapter or merged folder
    openai:<model>                any OpenAI-compatible endpoint (a hosted fine-tuned id too)
    <any of those>+rag            the same, with retrieved passages put into the last user turn

`chat`, `serve`, `eval` and `demo` all go through `Systems`, so a name means the
same thing everywhere, and a `+rag` system builds its prompt exactly as
`prepare` does for `data.rag: true` (`rag.retriever.retrieve_into`). Their local
systems load through the process's pool (engine/pool.py): one copy of each base
model, every adapter system on it, batched together; a merged model alone.

A conversation that comes without a system message gets the system prompt the run
trained with (`adapter/tuneforge.json`, else the prepared training data): a model
fine-tuned behind a persona answers off-topic without it, and base and finetuned
are then compared on the prompt users really send.

A relative `adapter:<dir>` or `merged:<dir>` written in the experiment file (eval.systems,
eval.judge.model) is read from the file's folder, as every other path in the file is;
one that exists only from the working directory (the old rule) still works, with a
warning naming what to write instead. Any other name (a command line's --system, the
demo's textbox) is read from the working directory, as a path typed in a shell is.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.engine.generation import Answer, Settings, available_systems
from tuneforge.errors import TuneforgeError
from tuneforge.hosted import openai_base_url, openai_job_model
from tuneforge.rag.retriever import retrieve_into

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

if TYPE_CHECKING:  # the engine (and torch) load with the first local system, not with this module
    from tuneforge.engine.transformers import Engine

RAG_SUFFIX = "+rag"
LOCAL_NAMES = ("base", "finetuned", "previous")
HINT = "use base, finetuned, adapter:<dir>, merged:<dir> or openai:<model>, each optionally with +rag"


@dataclass(frozen=True)
class Spec:
    name: str
    model: str  # the name without +rag
    rag: bool

    @property
    def hosted(self) -> bool:
        return self.model.startswith("openai:")


def parse(name: str) -> Spec:
    """Split a system name into its model and whether it retrieves; refuse what cannot be a system."""
    name = name.strip()
    rag = name.endswith(RAG_SUFFIX)
    model = name[: -len(RAG_SUFFIX)] if rag else name
    kind, colon, rest = model.partition(":")
    if model in LOCAL_NAMES or (colon and kind in ("adapter", "merged", "openai") and rest):
        return Spec(name, model, rag)
    raise TuneforgeError(f"unknown system {name!r}; {HINT}")


OPENAI_MODEL = re.compile(r"^(gpt-|chatgpt-|o\d)[\w.:-]*$")  # a bare OpenAI model name, as graders name theirs
FOLDER_MARKERS = {"adapter": "adapter_config.json", "merged": "config.json"}  # what makes a folder that system
_warned: set[tuple[str, str]] = set()  # (key, name) warned about, so a name asked for often warns once
_warned_lock = threading.Lock()


def file_keys(experiment: Experiment) -> dict[str, str]:
    """The adapter:/merged: models the experiment file names, each with the key it is written under."""
    written = [("eval.systems", n) for n in experiment.eval.systems]
    if experiment.eval.judge is not None:
        written.append(("eval.judge.model", experiment.eval.judge.model))
    keys: dict[str, str] = {}
    for key, name in written:
        try:
            model = parse(name).model
        except TuneforgeError:  # eval's baselines (tfidf, ngram, majority) are no systems
            continue
        if model.partition(":")[0] in FOLDER_MARKERS:
            keys.setdefault(model, key)
    return keys


def resolve(name: str, experiment: Experiment) -> Spec:
    """`parse`, with a relative adapter:/merged: folder made absolute: from the experiment file's folder when the
    file names it (from the working directory when only there, the old rule, with a warning), else from the
    working directory (a command line's path, as a shell reads it)."""
    spec = parse(name)
    kind, _, value = spec.model.partition(":")
    if kind not in FOLDER_MARKERS:
        return spec
    path = Path(value).expanduser()
    if not path.is_absolute():
        key = file_keys(experiment).get(spec.model)
        path = Path.cwd() / path if key is None else _from_file(kind, value, experiment, key)
    return replace(spec, model=f"{kind}:{path}")


def _from_file(kind: str, value: str, experiment: Experiment, key: str) -> Path:
    """A relative folder written in the experiment file: its folder's, or the working directory's with a warning
    when only that one holds the adapter (or merged model)."""
    in_file = experiment.resolve_path(value)
    in_cwd = Path.cwd() / value
    marker = FOLDER_MARKERS[kind]
    if (in_file / marker).exists() or not (in_cwd / marker).exists():
        return in_file  # a folder found nowhere is named by where it should be, in the error that follows
    with _warned_lock:
        first = (key, f"{kind}:{in_cwd}") not in _warned
        _warned.add((key, f"{kind}:{in_cwd}"))
    if first:
        instead = os.path.relpath(in_cwd.resolve(), experiment.base_dir.resolve())
        print(
            f"warning: {key}: {kind}:{value} is read from the working directory ({Path.cwd()}), the old rule; "
            f"paths in the experiment file are read from its folder ({experiment.base_dir}): write "
            f"{kind}:{instead} (or {kind}:{in_cwd.resolve()}) instead",
            file=sys.stderr,
        )
    return in_cwd


def with_system_prompt(conversations: list[list[dict]], system_prompt: str | None) -> list[list[dict]]:
    """Each conversation that has no system message opens with `system_prompt` (when there is one)."""
    if not system_prompt:
        return conversations
    return [
        m if any(x.get("role") == "system" for x in m) else [{"role": "system", "content": system_prompt}, *m]
        for m in conversations
    ]


class System(abc.ABC):
    """Answers chats; `+rag` variants retrieve first and return their sources with the answer."""

    def __init__(self, spec: Spec, retriever=None, special_tokens: tuple[str, ...] = ()):
        self.spec, self.name = spec, spec.name
        self.retriever = retriever
        self.special_tokens = special_tokens
        self.system_prompt: str | None = None  # given to conversations without one (Systems sets it)

    def retrieve(self, conversations: list[list[dict]]) -> tuple[list[list[dict]], list[list]]:
        """The conversations as this system sends them (with the default system prompt, augmented for +rag),
        and the hits used for each."""
        return retrieve_into(with_system_prompt(conversations, self.system_prompt), self.retriever, self.special_tokens)

    def generate(
        self, conversations: list[list[dict]], settings: Settings, batch_size: int = 16, progress: bool = False
    ) -> list[Answer]:
        prompts, hits = self.retrieve(conversations)
        answers = self._generate(prompts, settings, batch_size, progress)
        return [replace(a, sources=h) for a, h in zip(answers, hits)]

    def stream(self, messages: list[dict], settings: Settings) -> Iterator[str | Answer]:
        """Text pieces, then a final Answer carrying the totals and the retrieved sources."""
        (prompt,), (hits,) = self.retrieve([messages])
        pieces = self._stream(prompt, settings)
        try:
            for piece in pieces:
                yield replace(piece, sources=hits) if isinstance(piece, Answer) else piece
        finally:
            pieces.close()

    @abc.abstractmethod
    def _generate(self, conversations, settings, batch_size, progress) -> list[Answer]:
        """Answers for already-augmented conversations, in order."""

    @abc.abstractmethod
    def _stream(self, messages, settings) -> Iterator[str | Answer]:
        """Text pieces for an already-augmented conversation, then the final Answer."""


class LocalSystem(System):
    def __init__(self, spec: Spec, engine: Engine, retriever=None):
        super().__init__(spec, retriever, tuple(engine.tokenizer.all_special_tokens))
        self.engine = engine

    def _generate(self, conversations, settings, batch_size, progress):
        if len(conversations) == 1 and hasattr(
            self.engine, "answer"
        ):  # one caller among maybe many: batched dynamically
            return [self.engine.answer(conversations[0], settings)]
        return self.engine.generate(conversations, settings, batch_size=batch_size, progress=progress)

    def _stream(self, messages, settings):
        return self.engine.stream(messages, settings)


class HostedSystem(System):
    """A model behind an OpenAI-compatible API; the key comes only from OPENAI_API_KEY."""

    def __init__(self, spec: Spec, base_url: str | None, retriever=None, client=None):
        super().__init__(spec, retriever)
        self.model = spec.model.split(":", 1)[1]
        if client is None:
            try:
                import openai
            except ImportError:
                raise TuneforgeError(
                    f"system {spec.name!r} needs the openai client: pip install 'tuneforge[openai]'"
                ) from None
            # a local OpenAI-compatible server needs no key; the hosted API refuses the placeholder clearly
            client = openai.OpenAI(
                base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY") or "no-key-set", max_retries=4, timeout=120
            )
        self.client = client

    def _request(self, messages: list[dict], settings: Settings, stream: bool):
        import openai

        kwargs = dict(
            model=self.model,
            messages=messages,
            max_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            stream=stream,
        )
        if settings.seed is not None:
            kwargs["seed"] = settings.seed
        if settings.stop:
            kwargs["stop"] = list(settings.stop)
        if settings.tools:
            kwargs.update(tools=settings.tools, tool_choice=settings.tool_choice)
        try:
            return self.client.chat.completions.create(**kwargs)
        except openai.APIStatusError as exc:
            raise TuneforgeError(
                f"system {self.name!r}: the API answered {exc.status_code}: {_api_message(exc)}"
            ) from None
        except openai.APIConnectionError as exc:
            raise TuneforgeError(f"system {self.name!r}: cannot reach {self.client.base_url} ({exc})") from None

    def _generate(self, conversations, settings, batch_size, progress):
        from tqdm.auto import tqdm

        answers = []
        for messages in tqdm(conversations, desc=f"asking {self.name}", unit=" prompts", disable=not progress):
            reply = self._request(messages, settings, stream=False)
            choice = reply.choices[0]
            usage = reply.usage
            answers.append(
                _hosted_answer(
                    choice.message.content or "",
                    getattr(usage, "prompt_tokens", 0) or 0,
                    getattr(usage, "completion_tokens", 0) or 0,
                    choice.finish_reason or "stop",
                    [c.model_dump(exclude_none=True) for c in choice.message.tool_calls or []],
                )
            )
        return answers

    def _stream(self, messages, settings):
        stream = self._request(messages, settings, stream=True)
        text, finish = "", "stop"
        calls: dict[int, dict] = {}
        try:
            for chunk in stream:
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                piece = choice.delta.content or ""
                if piece:
                    text += piece
                    yield piece
                _add_call_pieces(calls, choice.delta.tool_calls)
                finish = choice.finish_reason or finish
        finally:
            stream.close()
        yield _hosted_answer(text, 0, 0, finish, [calls[i] for i in sorted(calls)])


def _add_call_pieces(calls: dict[int, dict], pieces) -> None:
    """Adds a chunk's tool-call deltas to the calls so far. OpenAI streams each call in pieces keyed by its index:
    the first carries the id, type and function name, the later ones only more of the arguments (JSON cut
    anywhere), so nothing is a call until the stream ends."""
    for piece in pieces or ():
        call = calls.setdefault(piece.index, {"type": "function", "function": {"arguments": ""}})
        if piece.id:
            call.setdefault("id", piece.id)
        if piece.type:
            call["type"] = piece.type
        if piece.function is not None:
            if piece.function.name:
                call["function"].setdefault("name", piece.function.name)
            call["function"]["arguments"] += piece.function.arguments or ""


def _hosted_answer(text: str, prompt_tokens: int, completion_tokens: int, finish: str, calls: list[dict]) -> Answer:
    """A hosted reply as an Answer, the same whether it was streamed or not. Made calls end it with finish reason
    tool_calls even where an OpenAI-compatible server says stop, as a local engine's parsed calls do."""
    if calls and finish == "stop":
        finish = "tool_calls"
    return Answer(text.strip(), prompt_tokens, completion_tokens, finish, tool_calls=calls or None)


def training_system_prompt(run: RunDir, spec: Spec | None = None) -> str | None:
    """The system prompt a system was trained with: its folder's tuneforge.json for adapter:/merged: systems,
    else this run's adapter (or merged) tuneforge.json, else the most common one in the run's prepared training data."""
    from tuneforge.data.records import common_system_prompt

    folders = [run.sub("adapter"), run.sub("merged")]
    if spec is not None and spec.model.startswith(("adapter:", "merged:")):
        folders = [Path(spec.model.split(":", 1)[1])]
    for folder in folders:
        try:
            saved = json.loads((folder / "tuneforge.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if "system_prompt" in saved:
            return saved["system_prompt"]
    train = run.sub("data", "train.jsonl")
    if not train.exists():
        return None
    with open(train, encoding="utf-8") as fh:
        return common_system_prompt(json.loads(line)["messages"] for line in fh if line.strip())


def _api_message(exc) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(exc)


class Systems:
    """The run's systems by name, loaded on first use and shared (X and X+rag share one model)."""

    def __init__(
        self,
        experiment: Experiment,
        run: RunDir,
        build_index: bool = True,
        system_prompt: str | None = None,
        max_batch: int = 16,
        planned: tuple[str, ...] = (),
        max_adapters: int | None = None,
        pool=None,
    ):
        self.experiment, self.run = experiment, run
        self.planned = (
            planned  # systems the caller will ask for (eval's list), so one vLLM engine is sized for them all
        )
        self.max_batch = max_batch  # concurrent conversations one generate call may carry
        self.build_index = build_index
        self.system_prompt_override = system_prompt  # None: the training one; "": none; text: that
        self.engines: dict[str, Engine] = {}
        self.systems: dict[str, System] = {}
        self.retriever = None
        self.lock = threading.RLock()
        # extra names that stand for a system, e.g. the model id of a fine-tuning job run by `serve`
        self.aliases: dict[str, str] = {}
        self._identities: dict[tuple, str] = {}
        self._pool = None  # the vLLM engines, with model.engine: vllm
        # the transformers bases: the process's, so serve, demo, chat and eval hold one copy of each base
        self._bases = pool
        self.max_adapters = max_adapters  # adapters loaded per base (None: the pool's own, 16); serve --max-adapters

    def available(self) -> list[str]:
        """What this run can answer with now: base, finetuned once trained, +rag variants, the OpenAI job's model."""
        names = list(available_systems(self.run))
        hosted = openai_job_model(self.run)
        if hosted:
            names.append(f"openai:{hosted}")
        if self.experiment.rag is not None:
            names += [f"{n}{RAG_SUFFIX}" for n in list(names)]
        return names + [a for a in self.aliases if a not in names]

    def spec(self, name: str) -> Spec:
        """The system a name (or alias) stands for, its adapter:/merged: folder absolute (see `resolve`)."""
        return resolve(self.aliases.get(name, name), self.experiment)

    def get(self, name: str) -> System:
        with self.lock:
            if name not in self.systems:
                spec = self.spec(name)
                retriever = self._retriever() if spec.rag else None
                if spec.hosted:
                    system: System = HostedSystem(spec, openai_base_url(self.experiment), retriever)
                else:
                    system = LocalSystem(spec, self._engine(spec.model), retriever)
                system.name = name
                system.system_prompt = self.system_prompt(name)
                self.systems[name] = system
            return self.systems[name]

    def system_prompt(self, name: str) -> str | None:
        """What a conversation without a system message gets when `name` answers it."""
        if self.system_prompt_override is not None:
            return self.system_prompt_override or None
        return training_system_prompt(self.run, self.spec(name))

    def identity(self, name: str) -> str:
        """Exactly which model answers as `name` now: the sha256 of an adapter's (or merged model's) weights, the
        base model's reference, or a hosted model's id. Feedback keeps it, so two versions of one name never mix."""
        from tuneforge.engine.generation import system_source

        spec = self.spec(name)
        if spec.hosted:
            return spec.model
        if spec.model == "base":
            return self.experiment.model.ref
        adapter, merged = system_source(spec.model, self.run)
        folder = Path(adapter or merged)
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        if not weights:
            return f"folder:{folder.resolve()}"
        key = tuple((str(w), w.stat().st_mtime_ns, w.stat().st_size) for w in weights)
        with self.lock:
            cached = self._identities.get(key)
        if cached is None:
            from tuneforge.atomic import file_sha256

            cached = "sha256:" + (
                file_sha256(weights[0])
                if len(weights) == 1
                else hashlib.sha256("".join(file_sha256(w) for w in weights).encode()).hexdigest()
            )
            with self.lock:
                self._identities[key] = cached
        return cached

    def scorer(self, name: str) -> Engine:
        """A transformers Engine for teacher-forced scoring (label log-likelihoods, perplexity) of a local system.

        It is the generating engine itself unless that is vLLM, which only generates.
        """
        spec = self.spec(name)
        if spec.hosted:
            raise TuneforgeError(f"system {name!r} is hosted; only local systems can be scored token by token")
        with self.lock:
            if self.experiment.model.engine == "transformers":
                return self._engine(spec.model)
            key = f"scoring:{spec.model}"
            if key not in self.engines:
                self.engines[key] = self._transformers_engine(spec.model)
            return self.engines[key]

    def _engine(self, model: str) -> Engine:
        if model not in self.engines:
            if self.experiment.model.engine == "vllm":
                from tuneforge.engine.vllm import VLLMEngine

                self.engines[model] = VLLMEngine.load(self.experiment, model, self.run, self._vllm_pool(model))  # type: ignore[assignment]
            else:
                self.engines[model] = self._transformers_engine(model)
                self.engines[model].max_batch = self.max_batch
        return self.engines[model]

    def _transformers_engine(self, model: str) -> Engine:
        """A merged model loads as an engine of its own; the base and every adapter system share one base."""
        from tuneforge.engine.generation import system_source

        if system_source(model, self.run)[1] is not None:
            from tuneforge.engine.transformers import Engine

            return Engine.load(self.experiment, model, self.run)
        return self.bases().engine(self.experiment, model, self.run)

    def bases(self):
        """The pool that holds one copy of each base model with every adapter system on it (engine/pool.py)."""
        if self._bases is None:
            from tuneforge.engine.pool import shared_pool

            self._bases = shared_pool()
        if self.max_adapters is not None:
            self._bases.max_adapters = self.max_adapters
        return self._bases

    def _vllm_pool(self, first: str):
        """One pool for the process, planned from every local system this run has and the caller plans to ask for:
        the bases (the model, and each merged folder) share the memory budget, and the engine holds the largest
        adapter rank among them (at least LORA_RANK_FLOOR, for adapters that come later: the fine-tuning API's)."""
        if self._pool is None:
            from tuneforge.engine.generation import system_source
            from tuneforge.engine.vllm import LORA_RANK_FLOOR, VLLMPool, adapter_rank

            names = {first}
            for name in [*self.available(), *self.planned]:
                try:
                    names.add(self.spec(name).model)
                except TuneforgeError:  # eval's baselines (tfidf, ngram, majority) plan no engine
                    continue
            sources = {system_source(m, self.run) for m in names if not m.startswith("openai:")}
            ranks = [LORA_RANK_FLOOR, self.experiment.lora.r] + [
                adapter_rank(adapter) for adapter, _ in sources if adapter
            ]
            self._pool = VLLMPool(
                self.experiment, bases=1 + len({merged for _, merged in sources if merged}), max_lora_rank=max(ranks)
            )
        return self._pool

    def _retriever(self):
        if self.experiment.rag is None:
            raise TuneforgeError("a +rag system needs a rag section in the experiment (rag.corpus names the documents)")
        if self.retriever is None:
            from tuneforge.rag import retriever as rag

            if not self.build_index:
                self.retriever = rag.Retriever(self.experiment, self.run)
            else:
                self.retriever = rag.ensure_index(self.experiment, self.run)
        return self.retriever


class GraderModels(Mapping):
    """What score_model and label_model graders ask, by the grader's `model` name: any system `get` gives (base,
    finetuned, adapter:<dir>, openai:<model>, a served ft: name), and a bare OpenAI model name (OpenAI's graders
    name `gpt-4o-2024-08-06`, `o3-mini`...) asked through openai:. A name that is neither is missing, so the grade
    fails with model_grader_server_error naming it. Systems load when a grader first asks."""

    def __init__(self, get: Callable[[str], System]):
        self._get = get

    def __getitem__(self, name: str) -> System:
        try:
            return self._get(name)
        except Exception:
            if not OPENAI_MODEL.match(name):
                raise KeyError(name) from None
        try:
            return self._get(f"openai:{name}")
        except Exception:
            raise KeyError(name) from None

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0
