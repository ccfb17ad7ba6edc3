"""Reading raw sources into checked, tokenized examples: the stages `tuneforge prepare` runs for each of
data.train and data.valid, and eval runs on eval.data (read, clean tables, check format, dedupe, sample, tokenize,
length policy)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from tuneforge.config_errors import did_you_mean
from tuneforge.data import convert, sources, tables
from tuneforge.data import split as splitting
from tuneforge.data.chat import ChatEncoder, TemplateRefusal, control_strings
from tuneforge.data.preference import fit_pair, pair_sides, read_pair
from tuneforge.data.prompts import prompt_only, read_prompt
from tuneforge.data.records import Example, Problem, Raw
from tuneforge.data.tools import from_legacy
from tuneforge.data.unpaired import desirability, read_unpaired
from tuneforge.data.validate import check_record
from tuneforge.errors import ConfigError, TuneforgeError

if TYPE_CHECKING:
    import pandas as pd

    from tuneforge.config import Experiment

RECORD_EXTRAS = ("tools", "parallel_tool_calls")  # record-level keys carried into the prepared file as given
ENCODE_BATCH = 256


class DataError(TuneforgeError):
    """Records failed the checks; nothing was written."""


@dataclass
class Collected:
    """One source (train or valid) after every stage, with what each stage did."""

    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    cleaning: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str, count: int) -> None:
        previous = self.stages[-1]["count"] if self.stages else None
        entry: dict[str, Any] = {"stage": name, "count": count}
        if previous is not None:
            entry["removed"] = previous - count
        self.stages.append(entry)

    def reject(self, where: str, problems: list[Problem], record: Any = None) -> None:
        self.problems.extend(problems)
        self.rejected.append(
            {"where": where, "problems": [{"code": p.code, "message": p.message} for p in problems], "record": record}
        )


class Preparer:
    def __init__(self, experiment: Experiment, tokenizer, progress: bool = True):
        self.experiment = experiment
        self.data = experiment.data
        self.encoder = ChatEncoder(tokenizer)
        self.progress = progress

    # ------------------------------------------------------------------ reading

    def collect(self, key: str, spec: str, sample: int | None) -> Collected:
        out = Collected()
        located = sources.locate(spec, self.experiment.base_dir, key)
        if isinstance(located, str):
            rows = sources.load_hub(located, key)
            fmt = (
                self.data.format
                if self.data.format != "auto"
                else sources.detect_format(None, rows[0] if rows else None, self.data.template is not None, key)
            )
            if fmt == "table":
                import pandas as pd

                frame = tables._as_text(pd.DataFrame(rows))
                self._tables(key, [(located, [frame])], out, sample)
            else:
                self._records(key, fmt, (Raw(f"{located} row {i}", row) for i, row in enumerate(rows, 1)), out, sample)
            return out

        by_format: dict[str, list[Path]] = {}
        for path in located:
            fmt = self.data.format
            if fmt == "auto":
                first = sources.first_record(path) if path.suffix.lower() in sources.JSON_SUFFIXES else None
                fmt = sources.detect_format(path, first, self.data.template is not None, key)
            by_format.setdefault(fmt, []).append(path)
        if len(by_format) > 1:
            raise TuneforgeError(f"{key}: files of different formats {sorted(by_format)}; keep one format per source")
        fmt, paths = next(iter(by_format.items()))
        if fmt == "table":
            files = [tables.open_table(p, self.data.encoding, key) for p in paths]
            columns = self._table_columns(key, files)
            self._tables(key, [(f.path.name, tables.read_chunks(f, columns), f) for f in files], out, sample)
        else:
            records = (raw for p in paths for raw in sources.read_json_records(p))
            self._records(key, fmt, records, out, sample)
        return out

    def _table_columns(self, key: str, files: list[tables.TableFile]) -> list[str]:
        """The columns the experiment names, checked against every file's header."""
        if self.data.template is None:
            raise ConfigError(
                key,
                [
                    f"data.template is needed to map the columns of {files[0].path.name} into chat messages "
                    f"(columns: {', '.join(tables.columns_of(files[0]))})"
                ],
            )
        template = self.data.template
        named: dict[str, str] = {}
        for part in ("system", "user", "assistant"):
            text = getattr(template, part)
            for column in convert.template_fields(text or ""):
                named.setdefault(column, f"data.template.{part}")
        if self.data.label:
            named.setdefault(self.data.label, "data.label")
        for column in self.data.clean.drop_empty:
            named.setdefault(column, "data.clean.drop_empty")
        for column in self.data.clean.fill_empty:
            named.setdefault(column, "data.clean.fill_empty")
        problems = []
        for table in files:
            header = tables.columns_of(table)
            for column, where in named.items():
                if column not in header:
                    hint = did_you_mean(column, header)
                    problems.append(
                        f"{where} names column {column!r}, which {table.path.name} does not have{hint} "
                        f"(columns: {', '.join(header)})"
                    )
        if problems:
            raise ConfigError(str(self.experiment._source or key), problems)
        return list(named)

    def _tables(self, key: str, files: list[tuple], out: Collected, sample: int | None) -> None:
        """files: (name, chunks) or (name, chunks, TableFile) per file."""
        clean = self.data.clean
        deduper = tables.Deduper() if clean.dedupe else None
        state = _TableState(tables.TableCounts(), deduper, tables.Sampler(sample, self.experiment.seed))
        with tqdm(desc=f"reading {key}", unit=" rows", disable=not self.progress, unit_scale=True) as bar:
            for file_index, (name, chunks, *info) in enumerate(files):
                table = info[0] if info else None
                state.names[file_index] = name
                if table is not None and table.text:
                    state.encodings[name] = table.note()
                for chunk in chunks:
                    bar.update(len(chunk))
                    self._read_chunk(chunk, file_index, table, state, out)
        _table_stages(state, out)
        rows = state.sampler.rows()
        if sample is not None:
            out.stage(f"seeded sample of {sample}", len(rows))
        out.cleaning = _cleaning(state)
        self._table_examples(rows, state.names, out)

    def _read_chunk(
        self, chunk: pd.DataFrame, file_index: int, table: tables.TableFile | None, state: _TableState, out: Collected
    ) -> None:
        """Clean, dedupe and offer one chunk to the sample; a file's ragged rows are rejected first."""
        if table is not None and table.ragged:
            chunk = _reject_ragged(chunk, state.names[file_index], table, state, out)
        chunk = tables.clean_chunk(chunk, self.data.clean, state.counts)
        if state.deduper is not None:
            chunk = state.deduper(chunk, state.counts)
        state.after_dedupe += len(chunk)
        state.sampler.add(chunk.assign(__file__=file_index))

    def _table_examples(self, rows: pd.DataFrame, names: dict[int, str], out: Collected) -> None:
        """The sampled rows through the template into chat examples; a row that renders invalid is rejected."""
        for record in rows.to_dict("records"):
            name = names[record["__file__"]]
            where = f"{name} row {record[tables.ROW]}"
            messages = convert.render_row(self.data.template, record)
            problems = check_record({"messages": messages}, where)
            if any(p.severity == "error" for p in problems):
                if any(p.code == "missing_content" for p in problems):
                    for p in problems:
                        p.message += " (add the column to data.clean.drop_empty or fill_empty)"
                out.reject(where, problems, _visible(record))
                continue
            label = record.get(self.data.label) if self.data.label else None
            out.examples.append(Example(messages, f"{Path(name).stem}:row{record[tables.ROW]}", where, label))
        out.stage("valid chat examples", len(out.examples))

    def _reads_prompts(self, key: str) -> bool:
        """GRPO's training and validation data may be prompts to answer (OpenAI's reinforcement format), and so may
        eval.data when eval.graders score the answers."""
        if key == "eval.data":
            return bool(self.experiment.eval.graders)
        return getattr(self.experiment.train, "method", None) == "grpo" and key in ("data.train", "data.valid")

    def _records(self, key: str, fmt: str, raws: Iterable[Raw], out: Collected, sample: int | None) -> None:
        to_messages = {"alpaca": convert.from_alpaca, "sharegpt": convert.from_sharegpt}.get(fmt)
        prompts = self._reads_prompts(key) and fmt == "messages"
        read = 0
        for raw in tqdm(raws, desc=f"reading {key}", unit=" records", disable=not self.progress):
            read += 1
            if raw.problem is not None:
                out.reject(raw.where, [raw.problem])
                continue
            record = raw.data
            if to_messages is not None:
                record, problem = to_messages(record, raw.where)
                if problem is not None:
                    out.reject(raw.where, [problem], raw.data)
                    continue
            if fmt == "preference":
                record, problems = read_pair(record, raw.where)
            elif fmt == "kto":
                record, problems = read_unpaired(record, raw.where)
            elif prompts:  # reinforcement: a prompt (or a supervised example) and every other key for the grader
                record, problems = read_prompt(from_legacy(record) if isinstance(record, dict) else record, raw.where)
            elif isinstance(record, dict):
                record = from_legacy(record)  # functions / function_call: today's tools / tool_calls
                problems = check_record(record, raw.where)
            else:
                problems = check_record(record, raw.where)
            if record is None or any(p.severity == "error" for p in problems):
                out.reject(raw.where, problems, raw.data)
                continue
            out.problems.extend(problems)  # warnings only
            desirable = record.get("label") if fmt == "kto" else None
            label = desirability(desirable) if fmt == "kto" else record.get(self.data.label or "label")
            meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
            messages = [{k: v for k, v in m.items()} for m in record["messages"]]
            rid = str(record.get("id") or raw.where.replace(" line ", ":").replace(" item ", ":"))
            if prompts:  # every key of the line is the grader's item
                extra = {k: v for k, v in record.items() if k not in ("messages", "meta")}
            else:
                extra = {k: record[k] for k in RECORD_EXTRAS if k in record}
            out.examples.append(
                Example(
                    messages,
                    rid,
                    raw.where,
                    None if label is None else str(label),
                    meta,
                    rejected=record.get("rejected"),
                    extra=extra,
                    desirable=desirable,
                )
            )
        out.stage("read", read)
        out.stage("valid chat examples", len(out.examples))
        if self.data.clean.dedupe:
            seen: set[str] = set()
            unique = []
            for example in out.examples:
                fingerprint = json.dumps(example.openai_record(), sort_keys=True, ensure_ascii=False)
                if fingerprint not in seen:
                    seen.add(fingerprint)
                    unique.append(example)
            out.examples = unique
            out.stage("exact duplicates", len(out.examples))
        if sample is not None:
            out.examples = splitting.sample(out.examples, sample, self.experiment.seed)
            out.stage(f"seeded sample of {sample}", len(out.examples))

    # ------------------------------------------------------------------ tokens

    def _encode(self, batch: list[Example], out: Collected) -> list[list | None]:
        """Per example its training sequences, or None for one the chat template cannot write (rejected into
        `out` under the template's words); a preference pair's are its two answers after the shared prompt."""
        try:
            return self._encode_batch(batch)
        except TemplateRefusal:
            pass  # one record the template refuses must not stop the others: each alone, to name the refused
        encoded: list[list | None] = []
        for example in batch:
            try:
                encoded += self._encode_batch([example])
            except TemplateRefusal as exc:
                problem = Problem(example.where, exc.code, str(exc))
                out.reject(example.where, [problem], example.openai_record())
                encoded.append(None)
        return encoded

    def _encode_batch(self, batch: list[Example]) -> list[list]:
        if any(prompt_only(e.messages) for e in batch):  # GRPO's prompts: the rendered prompt, nothing to learn
            answered = iter(self._encode_batch([e for e in batch if not prompt_only(e.messages)]))
            return [
                [self.encoder.encode_prompt(e.messages, e.extra.get("tools"))]
                if prompt_only(e.messages)
                else next(answered)
                for e in batch
            ]
        if not any(e.rejected is not None for e in batch):
            return self.encoder.encode_examples([e.messages for e in batch], [e.extra.get("tools") for e in batch])
        pairs = [e for e in batch if e.rejected is not None]
        flat = iter(
            self.encoder.encode_many(
                [s for e in pairs for s in pair_sides(e.messages, e.rejected)],
                [e.extra.get("tools") for e in pairs for _ in range(2)],
            )
        )
        # one batched tokenizer call for both sides of every pair; any other example as its own sequences
        return [
            [next(flat), next(flat)]
            if e.rejected is not None
            else self.encoder.encode_examples([e.messages], [e.extra.get("tools")])[0]
            for e in batch
        ]

    def measure(self, out: Collected) -> None:
        """Tokenize with the chat template, apply min_chars and the length policy, drop untrainable examples."""
        data = self.data
        if data.clean.min_chars:
            out.examples = [
                e for e in out.examples if prompt_only(e.messages) or len(_last_answer(e)) >= data.clean.min_chars
            ]
            out.stage(f"answer shorter than {data.clean.min_chars} chars", len(out.examples))
        self._warn_control_tokens(out)
        kept: list[Example] = []
        too_long = 0
        with tqdm(total=len(out.examples), desc="tokenizing", unit=" examples", disable=not self.progress) as bar:
            for start in range(0, len(out.examples), ENCODE_BATCH):
                batch = out.examples[start : start + ENCODE_BATCH]
                for example, sequences in zip(batch, self._encode(batch, out)):
                    if sequences is None:
                        continue
                    fitted = self._fit_length(example, sequences, out)
                    if fitted is None:
                        if data.overflow == "drop":
                            too_long += 1
                    elif _count_tokens(example, fitted, out):
                        kept.append(example)
                bar.update(len(batch))
        out.examples = kept
        label = {
            "drop": "longer than max_length (dropped)",
            "error": "longer than max_length (error)",
            "truncate": "fits max_length",
        }[data.overflow]
        out.stage(label, len(out.examples))
        if too_long:
            message = f"{too_long} examples longer than {data.max_length} tokens were dropped (data.overflow: drop)"
            out.problems.append(Problem("data", "too_long_dropped", message, "warning"))

    def _warn_control_tokens(self, out: Collected) -> None:
        """A record whose text holds the chat template's control-token strings (`<|im_start|>`...) is warned about:
        training reads them as control tokens, where inference reads any such text from a user, a tool or a
        passage as plain text (engine/prompt.py), so that nobody can forge a turn."""
        controls = control_strings(self.encoder.tokenizer)
        for example in out.examples:
            text = json.dumps([example.messages, example.rejected, example.extra.get("tools")], ensure_ascii=False)
            found = [c for c in controls if c in text]
            if found:
                message = (
                    f"the text holds the chat template's control-token string{'s' if len(found) > 1 else ''} "
                    f"{', '.join(found)}: training reads it as a control token, inference as plain text when a "
                    "user, a tool or a passage sends it; rewrite it unless the record means to teach that"
                )
                out.problems.append(Problem(example.where, "control_token_in_content", message, "warning"))

    def _fit_length(self, example: Example, sequences: list, out: Collected) -> list | None:
        """The example's sequences within data.max_length, truncated if need be; None when overflow drops or
        rejects the example."""
        data = self.data
        longest = max((len(s.input_ids) for s in sequences), default=0)
        if longest <= data.max_length:
            return sequences
        if data.overflow == "drop":
            return None
        if data.overflow == "error" or prompt_only(example.messages):
            message = f"{longest} tokens > data.max_length {data.max_length} (data.overflow: {data.overflow})"
            if prompt_only(example.messages):
                message += "; a prompt to sample from is not cut: raise data.max_length or set data.overflow: drop"
            out.reject(example.where, [Problem(example.where, "too_long", message)], example.openai_record())
            return None
        tools = example.extra.get("tools")
        if example.rejected is not None:
            prompt, sequences = fit_pair(
                self.encoder, example.messages, example.rejected, data.max_length, "truncate", tools
            )
            example.messages = [*prompt, example.messages[-1]]
        else:
            example.messages, sequences = self.encoder.fit(example.messages, data.max_length, "truncate", tools)
        return sequences


@dataclass
class _TableState:
    """What reading one source's tables gathers for its stages and its report."""

    counts: tables.TableCounts
    deduper: tables.Deduper | None
    sampler: tables.Sampler
    names: dict[int, str] = field(default_factory=dict)  # file index -> file name
    encodings: dict[str, str] = field(default_factory=dict)  # file name -> how its encoding was settled
    after_dedupe: int = 0
    ragged_rows: int = 0


def _reject_ragged(
    chunk: pd.DataFrame, name: str, table: tables.TableFile, state: _TableState, out: Collected
) -> pd.DataFrame:
    """Reject the rows whose line has more or fewer fields than the header: their cells cannot be told apart."""
    ragged = chunk[tables.ROW].isin(table.ragged.keys()).to_numpy()
    for record in chunk[ragged].to_dict("records"):
        line, fields = table.ragged[record[tables.ROW]]
        where = f"{name} row {record[tables.ROW]}"
        message = (
            f"line {line} has {fields} field{'s' if fields != 1 else ''} where the header has {table.header_fields}; "
            "quote the cell that holds the delimiter"
        )
        out.reject(where, [Problem(where, "ragged_row", message)], _visible(record))
    state.ragged_rows += int(ragged.sum())
    state.counts.rows_read += int(ragged.sum())  # clean_chunk counts the rows it sees, and these never reach it
    return chunk[~ragged]


def _table_stages(state: _TableState, out: Collected) -> None:
    """The reading stages' counts: the rows read, then what each cleaning rule took away."""
    counts = state.counts
    out.stage("read", counts.rows_read)
    running = counts.rows_read
    if state.ragged_rows:
        running -= state.ragged_rows
        out.stage("ragged rows (rejected)", running)
    for column, dropped in counts.dropped_empty.items():
        running -= dropped
        out.stage(f"empty {column} (dropped)", running)
    if state.deduper is not None:
        out.stage("exact duplicates", state.after_dedupe)


def _cleaning(state: _TableState) -> dict[str, Any]:
    counts = state.counts
    return {
        **({"encoding": state.encodings} if state.encodings else {}),
        "html_entities_unescaped": counts.unescaped,
        "whitespace_normalised": counts.whitespace_fixed,
        "empty_cells": dict(counts.emptied),
        "empty_cells_filled": dict(counts.filled),
    }


def _count_tokens(example: Example, sequences: list, out: Collected) -> bool:
    """Record the example's token counts; False (and rejected) when no token is left to learn from."""
    if prompt_only(example.messages):  # a prompt for GRPO: its rendered length, nothing trained on
        example.sequences = [(len(sequences[0].input_ids), 0)]
        example.n_tokens, example.n_trainable = example.sequences[0][0], 0
        return True
    sequences = [s for s in sequences if s.n_trainable]
    if not sequences:
        problem = Problem(example.where, "no_trainable_tokens", "no assistant token is left to learn from")
        out.reject(example.where, [problem], example.openai_record())
        return False
    example.sequences = [(len(s.input_ids), s.n_trainable) for s in sequences]
    example.n_tokens = max(n for n, _ in example.sequences)
    example.n_trainable = sum(n for _, n in example.sequences)
    example.truncated = any(s.truncated for s in sequences)
    example.missing_eot = any(s.missing_eot for s in sequences)
    return True


def _visible(record: dict[str, Any]) -> dict[str, Any]:
    """A table row as rejected.jsonl shows it: without the internal __row__ and __file__ columns."""
    return {k: v for k, v in record.items() if not k.startswith("__")}


def _last_answer(example: Example) -> str:
    answers = [m.get("content") or "" for m in example.messages if m.get("role") == "assistant"]
    return answers[-1] if answers else ""
