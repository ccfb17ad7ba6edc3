"""`tuneforge eval`: every system in eval.systems on the same examples, scored the same way, in one report.

    classification (the data has a label)   local systems pick the most likely label;
                                            hosted ones answer and the answer is read as a label
    generation (reference answers)          ROUGE-L, BLEU, similarity to the reference, quality
                                            (on topic), answering (says what the reference adds
                                            to the question), perplexity of the reference
    eval.judge                              pairwise comparison by a judge system, both orders
    eval.graders                            OpenAI graders on every system's answers (mean reward); with
                                            prompts alone (no reference, no label) the only measure

Writes runs/<name>/eval/: predictions.csv, metrics.json, report.md, report.html and
the charts; answers are cached in eval/cache/ so adding a system computes only it.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from tuneforge.data.tools import call_block
from tuneforge.errors import TuneforgeError
from tuneforge.eval import baselines, scores
from tuneforge.eval.cache import Cache, key, system_identity

if TYPE_CHECKING:
    from tuneforge.config import Experiment
    from tuneforge.run import RunDir

GENERATE_BATCH = 16
AGREEMENT = ("similarity", "quality", "answering")  # the judge-free scores checked against a judge's verdicts
SCORE_CHUNK = 32  # prompts per progress-bar step when scoring


@dataclass
class Item:
    """One eval example: the prompt, and what a right answer is."""

    id: str
    prompt: list[dict]
    reference: str | None
    label: str | None
    tools: list | None = None  # the functions the model may call (the example's `tools`)
    reference_calls: list | None = None  # the reference answer's tool calls, scored by function and arguments
    fields: dict = field(default_factory=dict)  # what eval.graders read as `item`: the line's keys, label, answer

    @property
    def question(self) -> str:
        return baselines.prompt_text(self.prompt[-1:]) or baselines.prompt_text(self.prompt)


@dataclass
class Outcome:
    """One system's answers on every item, and the per-example numbers behind its metrics."""

    name: str
    answers: list[str]
    sources: list[list[dict]] = field(default_factory=list)
    probabilities: np.ndarray | None = None  # classification: [items, labels]
    reference_logprob: list[float] | None = None  # generation: summed log-probability of the reference
    reference_tokens: list[int] | None = None
    seconds: float = 0.0
    tool_calls: list[list | None] = field(default_factory=list)  # per item: the calls the system made


def load_items(experiment: Experiment, run: RunDir) -> list[Item]:
    """eval.data mapped like prepare maps data (template, label), else the run's prepared valid split; sampled with
    the seed."""
    from tuneforge.data.prepared import load_prepared
    from tuneforge.data.split import sample

    if experiment.eval.data:
        from tuneforge.data.collect import Preparer
        from tuneforge.models import load_tokenizer

        examples = (
            Preparer(experiment, load_tokenizer(experiment.model), progress=False)
            .collect("eval.data", experiment.eval.data, None)
            .examples
        )
    else:
        examples = load_prepared(run.sub("data"), "valid")
    examples = [e for e in examples if e.desirable is not False]  # a KTO answer rated bad is no reference to match
    examples = sample(examples, experiment.eval.sample, experiment.seed)
    items = []
    for e in examples:
        last = max((i for i, m in enumerate(e.messages) if m.get("role") == "assistant"), default=None)
        prompt = e.messages[:last] if last is not None else e.messages
        reference = e.messages[last].get("content") if last is not None else None
        calls = e.messages[last].get("tool_calls") if last is not None else None
        if calls:  # the call as the model writes it is the text reference for similarity and overlap
            reference = "\n".join(filter(None, [reference, *(call_block(c) for c in calls)]))
        items.append(
            Item(e.id, prompt, reference, e.label, e.extra.get("tools"), calls or None, e.grader_item(reference))
        )
    if not items:
        raise TuneforgeError("no eval examples: eval.data is empty, or the run's valid split is (set data.valid_split)")
    return items


class Evaluation:
    """Computes each system's Outcome on the items, through the answer cache."""

    def __init__(
        self,
        experiment: Experiment,
        run: RunDir,
        items: list[Item],
        labels: list[str] | None,
        systems=None,
        progress: bool = True,
    ):
        from tuneforge.engine.transformers import Settings
        from tuneforge.systems import Systems

        self.experiment, self.run, self.items, self.labels = experiment, run, items, labels
        self.systems = (
            systems if systems is not None else Systems(experiment, run, planned=tuple(experiment.eval.systems))
        )
        self.progress = progress
        self.settings = Settings(max_new_tokens=experiment.eval.max_new_tokens, temperature=0.0, seed=experiment.seed)
        self.max_length = experiment.eval.max_length or experiment.data.max_length
        self.cache_dir = getattr(run, "eval_cache", None) or run.sub("eval", "cache")
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def outcome(self, name: str) -> Outcome:
        started = time.perf_counter()
        if name in baselines.BASELINES:
            result = self._baseline(name)
        else:
            cache = Cache(self.cache_dir, name)
            identity = system_identity(name, self.experiment, self.run)
            result = self._classify(name, identity, cache) if self.labels else self._generate(name, identity, cache)
            cache.save()
            return result  # its seconds: what its answers cost to compute, cached or not
        result.seconds = round(time.perf_counter() - started, 2)
        return result

    # ------------------------------------------------------------------ model systems

    def _classify(self, name: str, identity: dict, cache: Cache) -> Outcome:
        hosted = name.startswith("openai:")
        keys = [
            key(
                identity,
                "label",
                item.prompt,
                self.labels,
                self.max_length,
                self.settings.max_new_tokens if hosted else None,
            )
            for item in self.items
        ]
        missing = [i for i, k in enumerate(keys) if cache.get(k) is None]
        if missing:
            started = time.perf_counter()
            system = self.systems.get(name)
            prompts = [self.items[i].prompt for i in missing]
            if hosted:
                answers = system.generate(prompts, self.settings, progress=self.progress)
                for i, answer in zip(missing, answers):
                    cache.put(keys[i], {"text": answer.text, "sources": [h.to_json() for h in answer.sources]})
            else:
                augmented, hits = system.retrieve(prompts)
                sums = self._label_scores(name, augmented)
                for row, i in enumerate(missing):
                    cache.put(keys[i], {"scores": sums[row].tolist(), "sources": [h.to_json() for h in hits[row]]})
            cache.stamp([keys[i] for i in missing], time.perf_counter() - started)
        from tuneforge.scoring import probabilities

        values = [cache.entries[k] for k in keys]
        if hosted:
            picked = [scores.map_to_label(v["text"], self.labels) for v in values]
            probs = np.array([[1.0 if p == label else 0.0 for label in self.labels] for p in picked])
            answers = [v["text"] for v in values]
        else:
            probs = probabilities(np.array([v["scores"] for v in values]))
            answers = [self.labels[j] for j in probs.argmax(axis=1)]
        return Outcome(name, answers, [v["sources"] for v in values], probabilities=probs, seconds=cache.seconds(keys))

    def _generate(self, name: str, identity: dict, cache: Cache) -> Outcome:
        hosted = name.startswith("openai:")
        setting = (self.settings.max_new_tokens, self.settings.seed, self.max_length)
        answer_keys = [
            key(identity, "answer", item.prompt, setting, *([item.tools] if item.tools else [])) for item in self.items
        ]
        reference_keys = [
            key(identity, "reference", item.prompt, item.reference, self.max_length) for item in self.items
        ]
        need_answer = [i for i, k in enumerate(answer_keys) if cache.get(k) is None]
        scores_reference = not hosted and all(item.reference is not None for item in self.items)  # not for prompts
        need_reference = [i for i, k in enumerate(reference_keys) if cache.get(k) is None] if scores_reference else []
        if need_answer or need_reference:
            started = time.perf_counter()
            system = self.systems.get(name)
            if hosted:
                for tools, group in self._by_tools(need_answer):
                    answers = system.generate(
                        [self.items[i].prompt for i in group],
                        replace(self.settings, tools=tools),
                        progress=self.progress,
                    )
                    for i, answer in zip(group, answers):
                        cache.put(answer_keys[i], _answer_record(answer, answer.sources))
                cache.stamp([answer_keys[i] for i in need_answer], time.perf_counter() - started)
            else:
                from tuneforge.scoring import fit_prompt

                wanted = sorted(set(need_answer) | set(need_reference))
                augmented, hits = system.retrieve([self.items[i].prompt for i in wanted])
                by_item = dict(zip(wanted, zip(augmented, hits)))
                if need_reference:
                    sums, counts = self._scored(
                        name,
                        system,
                        [
                            by_item[i][0] + [{"role": "assistant", "content": self.items[i].reference}]
                            for i in need_reference
                        ],
                    )
                    for i, total, count in zip(need_reference, sums, counts):
                        cache.put(reference_keys[i], {"logprob": float(total), "tokens": int(count)})
                    cache.stamp([reference_keys[i] for i in need_reference], time.perf_counter() - started)
                started = time.perf_counter()
                if need_answer:
                    room = max(self.max_length - self.settings.max_new_tokens, 16)
                    for tools, group in self._by_tools(need_answer):
                        fitted = [fit_prompt(system.engine.encoder, by_item[i][0], room) for i in group]
                        answers = system.engine.generate(
                            fitted,
                            replace(self.settings, tools=tools),
                            batch_size=GENERATE_BATCH,
                            progress=self.progress,
                        )
                        for i, answer in zip(group, answers):
                            cache.put(answer_keys[i], _answer_record(answer, by_item[i][1]))
                    cache.stamp([answer_keys[i] for i in need_answer], time.perf_counter() - started)
        values = [cache.entries[k] for k in answer_keys]
        spent = cache.seconds(answer_keys + (reference_keys if scores_reference else []))
        outcome = Outcome(
            name,
            [_answer_text(v) for v in values],
            [v["sources"] for v in values],
            seconds=spent,
            tool_calls=[v.get("tool_calls") for v in values],
        )
        if scores_reference:
            references = [cache.entries[k] for k in reference_keys]
            outcome.reference_logprob = [r["logprob"] for r in references]
            outcome.reference_tokens = [r["tokens"] for r in references]
        return outcome

    def _by_tools(self, indices: list[int]) -> list[tuple[list | None, list[int]]]:
        """The items in groups that share one tools list (one generate call each)."""
        groups: dict[str, tuple[list | None, list[int]]] = {}
        for i in indices:
            tools = self.items[i].tools
            groups.setdefault(json.dumps(tools, sort_keys=True), (tools, []))[1].append(i)
        return list(groups.values())

    def _label_scores(self, name: str, prompts: list[list[dict]]) -> np.ndarray:
        from tqdm.auto import tqdm

        from tuneforge.scoring import label_logprobs

        rows = []
        with tqdm(
            total=len(prompts), desc=f"scoring labels ({name})", unit=" prompts", disable=not self.progress
        ) as bar:
            for start in range(0, len(prompts), SCORE_CHUNK):
                chunk = prompts[start : start + SCORE_CHUNK]
                scorer = self.systems.scorer(name)  # transformers even when answers come from vLLM
                rows.append(
                    label_logprobs(scorer.model, scorer.encoder, chunk, self.labels, max_length=self.max_length)
                )
                bar.update(len(chunk))
        return np.concatenate(rows)

    def _scored(self, name: str, system, conversations: list[list[dict]]) -> tuple[np.ndarray, np.ndarray]:
        from tqdm.auto import tqdm

        from tuneforge.scoring import answer_logprobs

        sums, counts = [], []
        with tqdm(
            total=len(conversations), desc=f"scoring ({name})", unit=" answers", disable=not self.progress
        ) as bar:
            for start in range(0, len(conversations), SCORE_CHUNK):
                chunk = conversations[start : start + SCORE_CHUNK]
                scorer = self.systems.scorer(name)  # transformers even when answers come from vLLM
                s, c = answer_logprobs(scorer.model, scorer.encoder, chunk, self.max_length)
                sums.append(s)
                counts.append(c)
                bar.update(len(chunk))
        return np.concatenate(sums), np.concatenate(counts)

    # ------------------------------------------------------------------ classical baselines

    def _train_split(self):
        from tuneforge.data.prepared import load_prepared

        return load_prepared(self.run.sub("data"), "train")

    def _baseline(self, name: str) -> Outcome:
        train = self._train_split()
        prompts = [item.prompt for item in self.items]
        if name == "majority":
            if not self.labels:
                raise TuneforgeError("the majority baseline classifies: it needs data.label (eval data with labels)")
            from tuneforge.data.records import label_summary

            top = label_summary(train)["majority_label"]  # the rule prepare's report uses
            probs = np.array([[1.0 if label == top else 0.0 for label in self.labels]] * len(prompts))
            return Outcome(name, [top] * len(prompts), [[] for _ in prompts], probabilities=probs)
        if name == "tfidf":
            if not self.labels:
                raise TuneforgeError("the tfidf baseline classifies: it needs data.label (eval data with labels)")
            model = baselines.TfidfClassifier(
                [e.messages[:-1] for e in train], [e.label for e in train], self.experiment.seed
            )
            probs = model.probabilities(prompts, self.labels)
            return Outcome(
                name, [self.labels[j] for j in probs.argmax(axis=1)], [[] for _ in prompts], probabilities=probs
            )
        ngram = baselines.NgramModel([baselines.last_answer(e.messages) for e in train])
        if self.labels:
            from tuneforge.scoring import probabilities

            probs = probabilities(np.array([[ngram.logprob(label)[0] for label in self.labels] for _ in prompts]))
            return Outcome(
                name, [self.labels[j] for j in probs.argmax(axis=1)], [[] for _ in prompts], probabilities=probs
            )
        answer = ngram.generate(self.settings.max_new_tokens)
        scored = [ngram.logprob(item.reference or "") for item in self.items]
        return Outcome(
            name,
            [answer] * len(prompts),
            [[] for _ in prompts],
            reference_logprob=[s for s, _ in scored],
            reference_tokens=[n for _, n in scored],
        )


def _answer_record(answer, hits) -> dict:
    record = {
        "text": answer.text,
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "finish_reason": answer.finish_reason,
        "sources": [h.to_json() if hasattr(h, "to_json") else h for h in hits],
    }
    if answer.tool_calls:
        record["tool_calls"] = answer.tool_calls
    return record


def _answer_text(record: dict) -> str:
    """The answer as text: what it said, and any calls as the model writes them."""
    calls = record.get("tool_calls") or []
    return "\n".join(filter(None, [record["text"], *(call_block(c) for c in calls)]))


def label_set(items: list[Item], run: RunDir) -> list[str] | None:
    """The classes when every item has a label: those of the eval items and of the train split, sorted."""
    if not items or any(item.label is None for item in items):
        return None
    from tuneforge.data.prepared import load_prepared

    labels = {item.label for item in items}
    if run.sub("data", "train.meta.jsonl").exists():
        labels |= {e.label for e in load_prepared(run.sub("data"), "train") if e.label is not None}
    return sorted(labels)


def check_graders(experiment: Experiment) -> list:
    """eval.graders validated, each a valid OpenAI grader with a name of its own; a ConfigError naming the file and
    each bad one (`tuneforge run` checks them before it prepares and trains, eval before it loads anything)."""
    from tuneforge.errors import ConfigError
    from tuneforge.graders import InvalidGrader, validate_grader

    problems, parsed = [], []
    for i, grader in enumerate(experiment.eval.graders):
        try:
            parsed.append(validate_grader(grader))
        except InvalidGrader as exc:
            problems += [f"eval.graders[{i}]: {problem}" for problem in exc.problems]
    names = [g.name for g in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        problems.append(f"eval.graders: each needs a name of its own ({', '.join(twice)} more than once)")
    if problems:
        raise ConfigError(str(experiment._source or "the experiment"), problems)
    return parsed


def run_eval(experiment: Experiment, run: RunDir, systems=None, progress: bool = True) -> int:
    """Evaluate every system in eval.systems, write runs/<name>/eval/, print a summary. Returns the exit code."""
    from tuneforge.eval import report

    graders = check_graders(experiment)  # before anything loads
    items = load_items(experiment, run)
    labels = label_set(items, run)
    prompts_only = labels is None and any(item.reference is None for item in items)
    if prompts_only and not graders:
        raise TuneforgeError(
            "eval examples need a reference answer (an assistant turn) or a label, or eval.graders to score answers"
        )
    mode = "classification" if labels else "graded" if prompts_only else "generation"
    print(
        f"evaluating {', '.join(experiment.eval.systems)} on {len(items)} examples ({mode}"
        f"{': ' + ', '.join(labels) if labels else ''})",
        flush=True,
    )
    evaluation = Evaluation(experiment, run, items, labels, systems, progress)
    names = list(experiment.eval.systems)
    if labels and "majority" not in names:
        names.append("majority")  # the floor: always the most common training label
    outcomes = [evaluation.outcome(name) for name in names]
    if labels:
        table, per_example = report.classification_metrics(items, labels, outcomes, experiment.seed)
    elif prompts_only:  # the graders are the only measure
        table = {o.name: {"examples": len(items), "seconds": o.seconds} for o in outcomes}
        per_example = {o.name: [{} for _ in items] for o in outcomes}
    else:
        table, per_example = report.generation_metrics(items, outcomes, experiment.seed, experiment.eval.embedder)
    if graders:
        from tuneforge.systems import GraderModels

        models = GraderModels(evaluation.systems.get)
        report.grader_metrics(graders, items, outcomes, table, per_example, models, experiment.seed, progress)
    judged = None
    if experiment.eval.judge is not None:
        judged = judge_pairs(experiment, run, evaluation, items, outcomes, per_example)
    folder = report.write(run.sub("eval"), items, labels, outcomes, table, per_example, judged, experiment)
    # what was evaluated, so `tuneforge compare` can tell runs scored on the same examples from the rest
    run.record(
        "eval",
        {
            "mode": mode,
            "items": len(items),
            "systems": names,
            "sample": experiment.eval.sample,
            "eval_set": key([(i.id, i.prompt, i.reference, i.label) for i in items])[:16],
        },
    )
    print(report.summary_table(table, labels is not None))
    if judged:
        for pair in judged["pairs"]:
            print(
                f"judge {judged['model']}: {pair['first']} vs {pair['second']}: "
                f"{pair['wins']} wins, {pair['ties']} ties, {pair['losses']} losses (win rate {pair['win_rate']:.2f}, "
                f"95% CI {pair['win_rate_low']:.2f}-{pair['win_rate_high']:.2f})"
                + (f"; its winner scored higher by {report.agreement_text(pair)}" if pair.get("agreement") else "")
            )
    print(f"eval report: {folder / 'report.html'} (metrics.json, predictions.csv, report.md beside it)")
    return 0


def judge_pairs(
    experiment: Experiment,
    run: RunDir,
    evaluation: Evaluation,
    items: list[Item],
    outcomes: list[Outcome],
    per_example: dict | None = None,
) -> dict | None:
    """Every pair of systems compared by eval.judge.model in both orders; judge replies are cached like answers.

    With the per-example scores, each pair also says how often similarity, quality and answering back the judge's
    winner (`agreement`), so a judge-free score is measured against the judge on this eval set."""
    from tuneforge.eval.judge import compare

    judge = experiment.eval.judge
    if evaluation.labels:
        print("eval.judge is skipped for classification: the labels decide who is right", flush=True)
        return None
    system = None
    cache = Cache(evaluation.cache_dir, f"judge-{judge.model}")
    identity = system_identity(judge.model, experiment, run)
    settings = type(evaluation.settings)(
        max_new_tokens=4, temperature=0.0, seed=experiment.seed
    )  # one word: A, B or tie

    def ask(chats: list[list[dict]]) -> list[str]:
        nonlocal system
        keys = [key(identity, "judge", chat, settings.max_new_tokens) for chat in chats]
        missing = [i for i, k in enumerate(keys) if cache.get(k) is None]
        if missing:
            system = system or evaluation.systems.get(judge.model)
            replies = system.generate([chats[i] for i in missing], settings, progress=evaluation.progress)
            for i, reply in zip(missing, replies):
                cache.put(keys[i], reply.text)
        return [cache.entries[k] for k in keys]

    questions = [item.question for item in items]
    references = [item.reference for item in items]
    pairs = []
    for a, b in itertools.combinations(outcomes, 2):
        result = compare(ask, judge.rubric, questions, references, a.name, a.answers, b.name, b.answers)
        pair = result.summary(experiment.seed)
        if per_example:
            pair["agreement"] = {
                metric: scores.judge_agreement(
                    result.outcomes, [r[metric] for r in per_example[a.name]], [r[metric] for r in per_example[b.name]]
                )
                for metric in AGREEMENT
            }
        pairs.append(pair)
    cache.save()
    return {"model": judge.model, "rubric": judge.rubric, "pairs": pairs}
