"""The experiment file: its schema, loading, dotted overrides and error listing.

Everything is validated here, once. Code after this point reads typed attributes.
Every field carries a docstring: it is the text `tuneforge config --explain` prints, so it stays one line
(what the key does, its default or unit); how a default was chosen, and the figures, go in docs/defaults.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from tuneforge.errors import ConfigError, UsageError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------- model


class ModelSection(Section):
    ref: str = "builtin:smollm2-135m-instruct"
    """The chat model: a hub id, a local directory, a .gguf file, or builtin:<name> (works offline)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin; required when trust_remote_code is on."""
    quantization: Literal["auto", "none", "4bit", "8bit"] = "auto"
    """Base weights: 4bit (NF4, QLoRA), 8bit or none (unquantized). auto: 4bit on a CUDA GPU, none on CPU."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype. auto: bfloat16 where the GPU supports it, float16 on older GPUs (T4), float32 on CPU."""
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """Attention kernel. auto: flash_attention_2 when installed on an Ampere+ GPU, else sdpa (packed rows: see docs)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run. auto: CUDA when available, else CPU."""
    trust_remote_code: bool = False
    """Run modelling code shipped with the model. Off unless set; needs a pinned revision."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """Generation engine for generate, chat, serve, eval and demo; vllm needs a CUDA GPU and `pip install vllm`."""
    chat_template: str | None = None
    """How chat turns are written when the tokenizer has none: chatml or a Jinja template; replaces the model's own."""
    vllm_memory: float = Field(0.7, gt=0.0, le=0.95)
    """With engine: vllm, the share of GPU memory that all vLLM engines of one process take together."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `model: builtin:smollm2-135m-instruct` is accepted for `model: {ref: ...}`.
        return {"ref": value} if isinstance(value, str) else value

    @field_validator("chat_template")
    @classmethod
    def _template_parses(cls, value: str | None) -> str | None:
        if value is None or value == "chatml":
            return value
        if "{{" not in value and "{%" not in value:
            raise ValueError(
                f"{value[:60]!r} is neither chatml nor a Jinja template "
                "(one writes the turns with {{ ... }} and {% ... %})"
            )
        import jinja2

        try:
            jinja2.Environment().parse(value)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"the Jinja template does not parse: {exc.message} (template line {exc.lineno})") from None
        return value

    @model_validator(mode="after")
    def _remote_code_needs_revision(self) -> ModelSection:
        if self.trust_remote_code and not self.revision:
            raise ValueError(
                "trust_remote_code: true needs model.revision pinned to a commit, "
                "so the code that runs is the code you reviewed"
            )
        return self


# --------------------------------------------------------------------------- data


class Template(Section):
    system: str | None = None
    """System message; may name columns in {braces}. Omit for no system message."""
    user: str
    """User message built from the row, e.g. "Review: {review}"."""
    assistant: str
    """Expected answer built from the row, e.g. "{rating}"."""


class Clean(Section):
    html_unescape: bool = True
    """Turn HTML entities such as &#039; and &amp; into characters."""
    normalize_whitespace: bool = True
    """Strip cells and collapse runs of spaces and tabs (line breaks are kept)."""
    drop_empty: list[str] = []
    """Columns whose empty cells drop the row."""
    fill_empty: dict[str, str] = {}
    """Columns whose empty cells are filled with the given text."""
    dedupe: bool = True
    """Drop exact duplicate examples."""
    min_chars: int = Field(0, ge=0)
    """Drop examples whose assistant answer is shorter than this many characters."""


class DataSection(Section):
    train: str | None = None
    """Training data: a file (.jsonl .json .csv .tsv .parquet), a folder, a glob, or a hub dataset name."""
    valid: str | None = None
    """Validation data in the same forms; when unset, valid_split carves it out of train."""
    format: Literal["auto", "messages", "alpaca", "sharegpt", "table", "preference", "kto"] = "auto"
    """Shape of the records. auto: detected from the extension and first records; preference: DPO pairs; kto: rated."""
    template: Template | None = None
    """How a table row becomes a chat example (needed for tables)."""
    label: str | None = None
    """Class column: enables stratified splits and classification metrics."""
    encoding: str = "auto"
    """Text encoding of CSV/TSV tables. auto: UTF-8, else detected and reported; or a codec name such as cp1252."""
    clean: Clean = Clean()
    """Cleaning steps, each reported with its counts."""
    sample: int | None = Field(None, gt=0)
    """Keep this many examples, drawn with the experiment seed."""
    valid_split: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of train held out for validation when `valid` is unset (stratified by label)."""
    max_length: int = Field(1024, gt=0)
    """Longest example in tokens, measured with the model's own tokenizer and chat template."""
    overflow: Literal["drop", "truncate", "error"] = "drop"
    """What to do with an example longer than max_length. Never silent: counts are reported."""
    on_invalid: Literal["error", "drop"] = "error"
    """error: stop and write nothing; drop: skip invalid records and list them in rejected.jsonl."""
    rag: bool = False
    """Build retrieval-augmented training examples with the rag section's retriever."""
    feedback: bool = False
    """Train on the demo's feedback (runs/<name>/feedback/) instead of data.train, from the run's current adapter."""

    @field_validator("encoding")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        if name == "auto":
            return name
        import codecs

        try:
            return codecs.lookup(name).name
        except LookupError:
            raise ValueError(
                f"unknown text encoding {name!r}; use auto or a codec name such as utf-8, cp1252, latin-1, utf-16"
            ) from None


# --------------------------------------------------------------------------- lora


class LoraSection(Section):
    r: int = Field(16, gt=0)
    """Adapter rank."""
    alpha: int = Field(32, gt=0)
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter input (0: off, PEFT's default)."""
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    """Which linear layers get adapters: all-linear, or a list of module names."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r), better at high ranks."""


# --------------------------------------------------------------------------- train


Auto = Literal["auto"]


class DPOSettings(Section):
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference: higher keeps it closer (OpenAI's dpo.hyperparameters.beta)."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "apo_zero", "sppo_hard"] = "sigmoid"
    """TRL's DPO loss: sigmoid is the original DPO loss."""


class GRPOSettings(Section):
    grader: dict[str, Any] | None = None
    """The reward: an OpenAI grader (string_check, text_similarity, score_model, python, multi...). auto with labels."""
    generations: int = Field(4, ge=2)
    """Completions sampled per prompt; each is scored against its group's mean (OpenAI-style: a group)."""
    max_completion_tokens: int = Field(32, gt=0)
    """Longest completion sampled during training."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the completions."""
    beta: float = Field(0.04, ge=0)
    """KL penalty toward the starting policy (0: none)."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """TRL's GRPO loss variant: dapo normalises by the tokens of the whole batch (no length bias)."""
    eval_generations: Union[int, None] = Field(None, ge=1)
    """Completions sampled per validation prompt at an evaluation (None: as many as `generations`)."""

    def generations_for(self, compute_multiplier: float) -> int:
        """`generations` scaled by OpenAI's reinforcement `compute_multiplier`; a group needs at least two."""
        return max(2, round(self.generations * compute_multiplier))


class KTOSettings(Section):
    beta: float = Field(0.1, gt=0)
    """How far the policy may move from the reference: higher keeps it closer (TRL's KTO beta)."""
    desirable_weight: Union[float, Auto] = Field("auto", union_mode="left_to_right")
    """Loss weight of desirable answers. auto: the rarer class is weighted up so both classes weigh the same."""
    undesirable_weight: Union[float, Auto] = Field("auto", union_mode="left_to_right")
    """Loss weight of undesirable answers. auto: as desirable_weight (1 for the more common class)."""

    @field_validator("desirable_weight", "undesirable_weight")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError("must be greater than 0 (or auto)")
        return value


class LocalTrain(Section):
    """Every knob that says `auto` is chosen from the prepared data by `tuneforge.data.plan` (prepare's report and
    the start of training print the value and why); a value you set always wins."""

    backend: Literal["local"] = "local"
    """local: QLoRA/LoRA SFT on this machine; openai: OpenAI's fine-tuning API."""
    method: Literal["sft", "dpo", "grpo", "kto"] = "sft"
    """sft: chat examples; dpo: preference pairs; kto: answers rated good or bad; grpo: rewards from a grader (TRL)."""
    dpo: DPOSettings = DPOSettings()
    """method: dpo settings."""
    grpo: GRPOSettings = GRPOSettings()
    """method: grpo settings."""
    kto: KTOSettings = KTOSettings()
    """method: kto settings: answers labelled desirable or undesirable, against the starting adapter (KTO)."""
    init_adapter: str | None = None
    """Start from this trained adapter (a folder, or a run holding adapter/); with dpo or kto also the reference."""
    epochs: Union[float, Auto] = Field("auto", union_mode="left_to_right")
    """Passes over the training data (ignored with max_steps). auto: 3, more for tiny files, fewer for large ones."""
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps to run; overrides epochs."""
    batch_size: Union[int, Auto] = "auto"
    """Examples (packed rows when packing) per optimizer step. auto: a power of two up to 32 giving enough steps."""
    micro_batch_size: Union[int, Auto] = "auto"
    """Sequences (or packed rows) per forward pass: a memory knob. auto: as many of the batch as fit 8,192 tokens."""
    grad_accum: Union[int, Auto] = "auto"
    """Micro-batches per optimizer step. auto: batch_size / micro_batch_size / processes."""
    lr: Union[float, Auto] = Field("auto", union_mode="left_to_right")
    """Peak learning rate. auto: LoRA 1e-3 for label-length answers, else 2e-4; full fine-tuning 2e-5; DPO, KTO 5e-5."""
    lr_multiplier: float = Field(1.0, gt=0)
    """Scales the learning rate, auto or set (OpenAI's learning_rate_multiplier)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    """Share of the steps spent warming the learning rate up from zero."""
    max_grad_norm: float = Field(1.0, ge=0.0)
    """Gradient clipping threshold (0 turns it off)."""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay."""
    optimizer: Literal["adamw", "paged_adamw_8bit"] = "adamw"
    """paged_adamw_8bit saves optimizer memory on GPU (bitsandbytes)."""
    gradient_checkpointing: Union[bool, Auto] = "auto"
    """Recompute activations in the backward pass: less memory, slower. auto: measured per token, only what must fit."""
    compile: Union[bool, Auto] = "auto"
    """torch.compile each decoder layer (fused norms, activations, RoPE). auto: off until measured faster on a GPU."""
    packing: Union[bool, Auto] = "auto"
    """Pack short examples into full rows, attention kept per example. auto: off for labelled or long data, else on."""
    label_weights: Literal["none", "balanced"] = "none"
    """With data.label: balanced weighs each example's loss by n / (classes x examples of its class)."""
    label_adjustment: float = Field(0.0, ge=0.0, le=2.0)
    """With data.label: logit adjustment toward rare labels in training (0: the labels' prior, 1: balanced error)."""
    prompt_loss_weight: float = Field(0.0, ge=0.0, le=1.0)
    """Weight of a language-modelling loss on the prompt's tokens, added as weight x its mean (0: off)."""
    full_finetune: bool = False
    """Train every weight instead of LoRA adapters (small models only; needs quantization: none)."""
    eval_every: Union[int, Auto] = "auto"
    """Evaluate on the valid split every N optimizer steps. auto: five evaluations per run."""
    save_every: Union[int, Auto] = "auto"
    """Write a checkpoint every N optimizer steps. auto: at every evaluation (needed to keep the best one)."""
    keep_checkpoints: int = Field(2, gt=0)
    """How many recent checkpoints to keep (the best one is kept besides)."""
    keep_best: bool = True
    """Keep the best evaluation's adapter, not the last step's (with data.label: only if better beyond chance)."""
    resume: Literal["never", "auto"] = "never"
    """auto: continue from the newest complete checkpoint of this run."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project."""
    extra_args: dict[str, Any] = {}
    """Further trainer options (TRL SFTConfig names), checked by building the trainer config."""

    @field_validator("epochs", "lr")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and value <= 0:
            raise ValueError("must be greater than 0 (or auto)")
        return value

    @field_validator("batch_size", "micro_batch_size", "grad_accum", "eval_every", "save_every")
    @classmethod
    def _positive_count(cls, value):
        if value != "auto" and value < 1:
            raise ValueError("must be a whole number of at least 1 (or auto)")
        return value


class OpenAITrain(Section):
    backend: Literal["openai"]
    """local: QLoRA/LoRA SFT on this machine; openai: OpenAI's fine-tuning API."""
    method: Literal["sft", "dpo"] = "sft"
    """sft: the job's method is supervised; dpo: preference tuning (method.type dpo) on pairs."""
    dpo: DPOSettings = DPOSettings()
    """method: dpo: beta is sent as method.dpo.hyperparameters.beta (loss_type is local only)."""
    model: str = "gpt-4o-mini-2024-07-18"
    """Hosted base model to fine-tune."""
    base_url: str | None = None
    """API base URL for OpenAI-compatible providers (default: OPENAI_BASE_URL or OpenAI)."""
    epochs: Union[int, Literal["auto"]] = "auto"
    """n_epochs for the job, or auto to let the service choose."""
    batch_size: Union[int, Literal["auto"]] = "auto"
    """Batch size for the job, or auto."""
    lr_multiplier: Union[float, Literal["auto"]] = "auto"
    """learning_rate_multiplier for the job, or auto."""
    suffix: str | None = Field(None, max_length=64)
    """Up to 64 characters added to the fine-tuned model's name."""
    wandb_project: str | None = None
    """Weights & Biases project for the job's integration."""
    price_per_1m_tokens: float = Field(3.0, ge=0)
    """USD per million billed training tokens for the estimate (gpt-4o-mini training price as listed 2024-07)."""
    metadata: dict[str, str] = {}
    """Key/value metadata attached to the job."""
    poll_seconds: float = Field(10.0, gt=0)
    """Seconds between status checks while watching the job (doubled after each network error, up to 5 minutes)."""


def _default_backend(value: Any) -> Any:
    if isinstance(value, dict) and "backend" not in value:
        return {**value, "backend": "local"}
    return value


TrainSection = Annotated[Union[LocalTrain, OpenAITrain], Field(discriminator="backend")]


# --------------------------------------------------------------------------- rag, eval, demo


class RagSection(Section):
    corpus: str
    """Documents to retrieve from: a folder of .md/.txt, a JSONL/CSV with a text column, or `train`."""
    text_column: str = "text"
    """Column or key holding the text, for JSONL/CSV corpora."""
    embedder: str = "builtin:all-minilm-l6-v2"
    """Sentence-transformers model (builtin, directory or hub id)."""
    chunk_tokens: int = Field(128, gt=8)
    """Chunk size in tokens of the embedder's tokenizer (at most what the embedder reads)."""
    chunk_overlap: int = Field(32, ge=0)
    """Tokens shared by consecutive chunks."""
    k: int = Field(4, gt=0)
    """Chunks retrieved per question."""
    history_turns: int = Field(2, ge=0)
    """Earlier user turns that join the last one in a conversation's retrieval query (0: the last turn alone)."""
    history_weight: float = Field(0.7, gt=0.0, le=1.0)
    """Weight of each earlier turn in the query, per turn back (0.7: the turn before counts 0.7, the next 0.49)."""
    index: Literal["auto", "flat", "hnsw", "ivf"] = "auto"
    """FAISS index type. auto: exact flat for small corpora, HNSW for large ones."""
    min_score: float | None = None
    """Drop hits whose cosine similarity is below this."""
    mmr: bool = False
    """Re-rank hits with maximal marginal relevance for diversity."""

    @model_validator(mode="after")
    def _overlap_below_size(self) -> RagSection:
        if self.chunk_overlap >= self.chunk_tokens:
            raise ValueError(
                f"chunk_overlap ({self.chunk_overlap}) must be smaller than chunk_tokens ({self.chunk_tokens})"
            )
        return self


SYSTEM_NAME = re.compile(r"^(base|finetuned)(\+rag)?$|^openai:.+$|^tfidf$|^ngram$|^majority$|^(adapter|merged):.+$")


class JudgeSection(Section):
    model: str
    """The judge: a model system (base, finetuned, adapter:<dir>, merged:<dir>) or openai:<model>."""

    @field_validator("model")
    @classmethod
    def _judge_is_a_model(cls, model: str) -> str:
        if model in ("tfidf", "ngram", "majority") or model.endswith("+rag") or not SYSTEM_NAME.match(model):
            raise ValueError(
                "the judge must be a model (base, finetuned, adapter:<dir>, merged:<dir> or openai:<model>), "
                f"not {model!r}"
            )
        return model

    rubric: str = "Which answer is more helpful, correct and faithful to the question?"
    """What the judge is asked to compare."""


class EvalSection(Section):
    systems: list[str] = ["base", "finetuned"]
    """Systems to compare: (base|finetuned)[+rag], openai:<model>, tfidf, ngram, majority, (adapter|merged):<dir>."""
    data: str | None = None
    """Eval set in any form prepare accepts (default: the run's valid split)."""
    sample: int | None = Field(None, gt=0)
    """Evaluate on this many examples, drawn with the experiment seed."""
    max_new_tokens: int = Field(256, gt=0)
    """Longest generated answer in tokens (hosted systems' answers too, when they classify by answering)."""
    max_length: int | None = Field(None, gt=0)
    """Longest prompt plus answer in tokens; longer prompts keep their end (default: data.max_length)."""
    embedder: str = "builtin:all-minilm-l6-v2"
    """Sentence-transformers model for similarity to the reference and the quality score (builtin, dir or hub id)."""
    judge: JudgeSection | None = None
    """LLM-as-judge pairwise comparison; off when unset."""
    graders: list[dict[str, Any]] = []
    """OpenAI graders scored on every system's answers (mean reward, 95% interval); `item` is the example's fields.
    Each is checked, with a name of its own, before eval loads anything."""

    @field_validator("systems")
    @classmethod
    def _known_systems(cls, systems: list[str]) -> list[str]:
        bad = [s for s in systems if not SYSTEM_NAME.match(s)]
        if bad:
            raise ValueError(
                f"unknown system(s) {bad}; allowed: base, finetuned, base+rag, finetuned+rag, openai:<model>, "
                "tfidf, ngram, majority, adapter:<dir>, merged:<dir>"
            )
        return systems


class DemoSection(Section):
    host: str = "127.0.0.1"
    """Interface to bind; loopback unless you mean to expose it."""
    port: int = Field(7860, gt=0, lt=65536)
    """Port of the Gradio page."""
    share: bool = False
    """Public share link (same as --share); refused unless the auth_env variable is set."""
    auth_env: str = "TUNEFORGE_DEMO_AUTH"
    """Environment variable holding user:password; when set, the page asks for them (kept out of the file)."""
    presets: dict[str, str] = {}
    """Format presets: a name shown on the page -> the system prompt it fills in."""
    queue_size: int = Field(16, gt=0)
    """Requests that may wait for a model; more are turned away, so a busy page cannot pile up work."""
    concurrency: int = Field(2, gt=0)
    """Chat or compare requests answered at once; each local model still generates one answer at a time."""


# --------------------------------------------------------------------------- sweep


class Range(Section):
    low: float
    """Smallest value drawn."""
    high: float
    """Largest value drawn."""
    log: bool = False
    """Draw uniformly on a log scale (learning rates); needs low > 0."""
    integer: bool = False
    """Round each draw to a whole number (ranks, batch sizes)."""

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) is below low ({self.low})")
        if self.log and self.low <= 0:
            raise ValueError("log: true needs low > 0")
        return self


class SweepSection(Section):
    """`tuneforge sweep FILE` runs the experiment once per point under runs/<name>/sweep/<point>/."""

    grid: bool = False
    """Every combination of the params' values (the default when random is unset)."""
    random: int | None = Field(None, gt=0)
    """Draw this many seeded points instead of the whole grid; params may then be ranges {low, high, log, integer}."""
    params: dict[str, Union[list[Any], Range]]
    """Dotted experiment keys and the values each point takes, e.g. {"train.lr": [1e-4, 2e-4], "lora.r": [8, 16]}."""
    metric: str = "auto"
    """Metric ranking the points, finetuned's or <system>.<metric>. auto: accuracy with data.label, else similarity."""
    goal: Literal["auto", "max", "min"] = "auto"
    """Whether a higher or a lower metric is better. auto: min for perplexity, else max."""
    early_stop: bool = False
    """Median stopping rule: a point stops when its best valid value trails the others' median by early_stop_margin."""
    early_stop_margin: float = Field(0.02, ge=0.0)
    """How far behind counts as clearly behind: absolute for accuracy, relative for loss (0.02: 2%)."""

    @field_validator("params")
    @classmethod
    def _params_usable(cls, params: dict) -> dict:
        if not params:
            raise ValueError('needs at least one key, e.g. {"train.lr": [1e-4, 2e-4]}')
        problems = []
        for key, values in params.items():
            if key.split(".")[0] in ("sweep", "name"):
                problems.append(f"{key}: cannot be swept (each point is the experiment itself, in its own folder)")
            elif isinstance(values, list) and not values:
                problems.append(f"{key}: empty list; give at least one value")
        if problems:
            raise ValueError("; ".join(problems))
        return params

    @model_validator(mode="after")
    def _one_way_to_draw(self) -> SweepSection:
        if self.grid and self.random is not None:
            raise ValueError("set grid: true or random: N, not both")
        ranges = [k for k, v in self.params.items() if isinstance(v, Range)]
        if ranges and self.random is None:
            raise ValueError(f"params {', '.join(ranges)} are ranges: a grid needs lists of values (or set random: N)")
        return self


# --------------------------------------------------------------------------- experiment


class Experiment(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """Run name; the run goes to runs/<name> unless --run-dir says otherwise."""
    seed: int = 42
    """Seed for sampling, splitting, initialisation and data order."""
    model: ModelSection = ModelSection()
    """The chat model and how it is loaded."""
    data: DataSection = DataSection()
    """Where the examples come from and how they are cleaned, checked and split."""
    lora: LoraSection = LoraSection()
    """Adapter shape."""
    train: TrainSection = LocalTrain()
    """How to train: backend local (QLoRA SFT) or openai (hosted fine-tuning)."""
    rag: RagSection | None = None
    """Retrieval over your documents; off when the section is absent."""
    eval: EvalSection = EvalSection()
    """Which systems to compare, on which data."""
    demo: DemoSection = DemoSection()
    """The Gradio page."""
    sweep: SweepSection | None = None
    """Variants of this experiment for `tuneforge sweep`; ignored by every other verb."""

    _source: Path | None = PrivateAttr(None)

    @field_validator("train", mode="before")
    @classmethod
    def _train_backend_defaults_to_local(cls, value: Any) -> Any:
        return _default_backend(value)

    @model_validator(mode="after")
    def _cross_section_rules(self) -> Experiment:
        problems = []
        if any(s.endswith("+rag") for s in self.eval.systems) and self.rag is None:
            problems.append("eval.systems names a +rag system but the experiment has no rag section")
        for classifier in ("tfidf", "majority"):
            if classifier in self.eval.systems and self.data.label is None:
                problems.append(
                    f"eval.systems names {classifier}, a classifier, but data.label is unset "
                    f"({classifier} needs a label to learn)"
                )
        if self.data.rag and self.rag is None:
            problems.append("data.rag is true but the experiment has no rag section")
        if self.data.rag and self.rag is not None and self.rag.corpus == "train":
            problems.append(
                "data.rag with rag.corpus: train would retrieve each training example's own answer into its prompt; "
                "point rag.corpus at separate documents"
            )
        if isinstance(self.train, LocalTrain) and self.train.full_finetune:
            if self.model.quantization == "auto":
                self.model.quantization = "none"  # every weight trains: nothing to quantize
            elif self.model.quantization != "none":
                problems.append(
                    "train.full_finetune needs model.quantization: none (quantized weights cannot be trained directly)"
                )
        if self.train.method == "dpo" and self.data.format not in ("auto", "preference"):
            problems.append(
                f"train.method: dpo trains on preference pairs, but data.format is {self.data.format}; "
                "use preference (or auto)"
            )
        if self.train.method == "dpo" and isinstance(self.train, LocalTrain) and self.train.full_finetune:
            problems.append(
                "train.method: dpo trains LoRA adapters (the reference is the policy with its adapter off); "
                "set train.full_finetune: false"
            )
        if self.train.method == "dpo" and isinstance(self.train, LocalTrain) and self.train.prompt_loss_weight:
            problems.append(
                "train.prompt_loss_weight is an SFT loss on the prompt; DPO compares two answers to one prompt. "
                "Remove it"
            )
        if self.train.method == "dpo" and self.data.label is not None:
            problems.append("train.method: dpo has no use for data.label (pairs are not classes); remove data.label")
        problems += _kto_rules(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def base_dir(self) -> Path:
        """Folder that relative paths in the file are read from: the file's own folder."""
        return self._source.parent if self._source else Path.cwd()

    def resolve_path(self, value: str) -> Path:
        """A path from the file, resolved against the file's folder."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _kto_rules(experiment: Experiment) -> list[str]:
    """What train.method kto and data.format kto need of each other and of the rest."""
    data, train = experiment.data, experiment.train
    if train.method != "kto":
        if data.format == "kto":
            return [f"data.format: kto holds answers labelled for train.method: kto, not {train.method}"]
        return []
    problems = []
    if data.format not in ("auto", "kto"):
        problems.append(
            f"train.method: kto trains on answers labelled desirable or undesirable, but data.format is "
            f"{data.format}; use kto (or auto)"
        )
    if data.label is not None:
        problems.append("train.method: kto reads each record's own 'label' (true or false); remove data.label")
    if train.full_finetune:
        problems.append(
            "train.method: kto trains LoRA adapters (the reference is the starting adapter); "
            "set train.full_finetune: false"
        )
    if train.prompt_loss_weight:
        problems.append("train.prompt_loss_weight is an SFT loss on the prompt; KTO judges answers. Remove it")
    for key in ("batch_size", "micro_batch_size"):
        if getattr(train, key) == 1:
            problems.append(
                f"train.{key}: 1 leaves KTO no other answer in a micro-batch to estimate its KL term from; "
                "use at least 2 (or auto)"
            )
    return problems


# --------------------------------------------------------------------------- loading


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 0.0001). Values are read as YAML scalars or lists."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("override", [f"{text!r} is not of the form dotted.key=value"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and i == 0 and part == "model":
            child = node[part] = {"ref": child}
        elif not isinstance(child, dict):
            raise ConfigError("override", [f"{text}: {'.'.join(path[: i + 1])} is {child!r}, not a section"])
        node = child
    node[path[-1]] = value


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each dotted key path of a YAML document to its 1-based line number."""
    import yaml

    lines: dict[tuple[str, ...], int] = {}

    def walk(node: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                path = prefix + (str(key_node.value),)
                lines[path] = key_node.start_mark.line + 1
                walk(value_node, path)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[prefix + (str(i),)] = item.start_mark.line + 1
                walk(item, prefix + (str(i),))

    try:
        walk(yaml.compose(text), ())
    except yaml.YAMLError:
        pass
    return lines


def _duplicate_keys(text: str) -> list[str]:
    """`seed: 1` then `seed: 2` in one mapping: YAML keeps the last silently, so name both lines."""
    import yaml

    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key_node, value_node in node.value:
                key = str(key_node.value)
                line = key_node.start_mark.line + 1
                if key in seen:
                    found.append(f"line {line}: {prefix}{key}: given twice (lines {seen[key]} and {line}); keep one")
                seen.setdefault(key, line)
                walk(value_node, f"{prefix}{key}.")
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}{i}.")

    try:
        walk(yaml.compose(text), "")
    except yaml.YAMLError:
        pass
    return found


def load_experiment(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), point: dict[str, Any] | None = None
) -> Experiment:
    """Read, override and validate an experiment file; raise ConfigError listing every problem.

    `point`: one sweep point's dotted keys and values, set after the overrides; the sweep section is dropped,
    so the result is a plain run. Problems with them are named `sweep.params <key>`."""
    import yaml

    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no experiment file {source} (looked from {Path.cwd()})") from None
    except IsADirectoryError:
        raise UsageError(f"{source} is a folder; name the experiment's YAML file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, [f"not UTF-8 text (byte {exc.start})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(source, [f"{where}invalid YAML: {getattr(exc, 'problem', exc)}"]) from None
    duplicates = _duplicate_keys(text)
    if duplicates:
        raise ConfigError(source, duplicates)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [f"the file must be a mapping of sections, got {type(raw).__name__}"])

    overridden: dict[tuple[str, ...], str] = {}
    for text_override in overrides:
        keys, value = parse_override(text_override)
        _set_dotted(raw, keys, value, text_override)
        overridden[tuple(keys)] = "override "
    if point is not None:
        raw.pop("sweep", None)
        lines = _key_lines(text)
        for dotted, value in point.items():
            _set_dotted(raw, dotted.split("."), value, f"sweep.params {dotted}")
            line = lines.get(("sweep", "params", dotted))
            overridden[tuple(dotted.split("."))] = f"{f'line {line}: ' if line else ''}sweep.params "

    try:
        experiment = Experiment.model_validate(raw)
    except ValidationError as exc:
        from tuneforge.config_errors import describe_errors

        raise ConfigError(source, describe_errors(exc, Experiment, _key_lines(text), overridden)) from None
    experiment._source = path.resolve()
    return experiment
