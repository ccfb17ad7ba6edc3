"""Does GRPO after SFT pay off? SFT on labelled reviews, then GRPO from that adapter, both scored on held-out reviews.

1. SFT: benchmarks/outcome.py's `run_split` (a seeded, stratified held-out quarter; `tuneforge prepare`, `train`
   and `eval` with every training knob on auto), so the SFT adapter is the one that benchmark measures.
2. GRPO: `train.method: grpo` from that adapter (`train.init_adapter`) on the same training part, rewarded by
   string_check eq `{{sample.output_text}}` vs `{{item.label}}` (what GRPO uses with data.label and no grader),
   for --grpo-steps steps of 8 prompts x --generations completions; no valid split, so no sampled evaluations
   (the last step's adapter is kept). `tuneforge prepare` and `train` run as a user runs them.
3. Both adapters on the held-out reviews:
     accuracy   `tuneforge eval`'s label scoring (a local system picks the most likely label), exact match
     reward     mean string_check reward of greedy answers (`tuneforge generate`, temperature 0), graded by
                tuneforge.graders with the reward GRPO trained on
   each with a 95% Wilson interval, and GRPO - SFT with a paired bootstrap interval over the held-out reviews.

    python benchmarks/grpo_outcome.py                                  # the shipped (templated) review table
    python benchmarks/grpo_outcome.py --preset drug-reviews --table ../shared/data/drug-reviews-dev.tsv
    python benchmarks/grpo_outcome.py ... --grpo-steps 4 --sft-sample 100 --heldout-sample 40   # a quick look

Prints each verb's output tail as it finishes and each GRPO step's reward as it is logged, then a table of SFT and
GRPO side by side with GRPO - SFT and GRPO / SFT, seconds per GRPO step, and the peak resident memory of each verb's
process. On 2 shared CPU cores the drug-review run took an hour: SFT 35 min (306 steps), GRPO a median 39 s a
step of 8 prompts x 4 two-token completions (20 steps, 22 min), eval and greedy answers 2.5 min.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from outcome import PRESETS, run_split  # noqa: E402

# the reward GRPO trains on: the default with data.label, written out so the greedy answers are graded the same way
GRADER = {
    "type": "string_check",
    "name": "label",
    "input": "{{sample.output_text}}",
    "reference": "{{item.label}}",
    "operation": "eq",
}
HEARTBEAT_S = 60  # a line at least this often while a verb runs, so a long train is visibly alive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="reviews")
    parser.add_argument("--table", type=Path, help="the labelled table (default: the preset's)")
    parser.add_argument("--holdout", type=float, default=0.25, help="share held out for scoring (stratified)")
    parser.add_argument("--seed", type=int, default=42, help="the split's and both experiments' seed")
    parser.add_argument("--work", type=Path, help="keep the split, experiments and runs here (default: a temp folder)")
    parser.add_argument("--sft-sample", type=int, help="SFT on this many training reviews (data.sample; default all)")
    parser.add_argument(
        "--heldout-sample", type=int, help="score this many held-out reviews (eval.sample; default all)"
    )
    parser.add_argument("--grpo-steps", type=int, default=20, help="GRPO optimizer steps (train.max_steps)")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt (train.grpo.generations)")
    parser.add_argument(
        "--max-completion-tokens",
        type=int,
        default=8,
        help="longest sampled and greedy answer; a label is one or two tokens and the end of turn",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="GRPO sampling temperature")
    parser.add_argument("--beta", type=float, default=0.04, help="KL penalty toward the SFT adapter")
    parser.add_argument("--loss-type", choices=["grpo", "dr_grpo", "dapo", "bnpo"], default="dapo")
    parser.add_argument("--sft-override", action="append", default=[], help="dotted.key=value for the SFT experiment")
    parser.add_argument("--grpo-override", action="append", default=[], help="dotted.key=value for the GRPO one")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    table = args.table or preset["table"]
    if table is None:
        sys.exit(f"--preset {args.preset} needs --table PATH")
    work = (args.work or Path(tempfile.mkdtemp(prefix="tuneforge-grpo-outcome-"))).resolve()
    sampled = [f"eval.sample={args.heldout_sample}"] if args.heldout_sample else []
    started = time.perf_counter()

    # ------------------------------------------------------------------ 1. SFT, as outcome.py trains and scores it
    print(f"1. SFT on {Path(table).name} (benchmarks/outcome.py; each verb's output when it ends)", flush=True)
    sft_override = [*([f"data.sample={args.sft_sample}"] if args.sft_sample else []), *sampled, *args.sft_override]
    split_args = argparse.Namespace(preset=args.preset, holdout=args.holdout, override=sft_override)
    sft = run_split(split_args, preset, Path(table), work / "sft", args.seed)
    sft_seconds = time.perf_counter() - started
    sft_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux -> GiB

    # ------------------------------------------------------------------ 2. GRPO from the SFT adapter
    print(f"\n2. GRPO from the SFT adapter: {args.grpo_steps} steps", flush=True)
    experiment = write_grpo_experiment(args, work)
    run = work / "grpo" / "run"
    common = [*sampled, *args.grpo_override]
    measured = {
        "prepare": run_verb("prepare", experiment, run, common),
        "train": run_verb("train", experiment, run, common, watch=GRPOProgress(run, args.grpo_steps)),
        "eval": run_verb("eval", experiment, run, common),
    }

    # ------------------------------------------------------------------ 3. greedy answers of both adapters, graded
    print("\n3. greedy answers of both adapters on the held-out reviews, graded by the GRPO reward", flush=True)
    held = read_predictions(work / "sft" / "run" / "eval" / "predictions.csv", "finetuned")
    prompts = work / "grpo" / "heldout-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "messages": row["messages"]}) + "\n" for i, row in held.items()))
    sft_adapter = f"adapter:{work / 'sft' / 'run' / 'adapter'}"
    greedy = {}
    for name, system in (("sft", sft_adapter), ("grpo", "finetuned")):
        answers = work / "grpo" / f"greedy-{name}.jsonl"
        extra = [
            *common,
            *("--system", system, "--input", str(prompts), "--output", str(answers)),
            *("--max-new-tokens", str(args.max_completion_tokens), "--temperature", "0"),
        ]
        measured[f"generate {name}"] = run_verb("generate", experiment, run, extra, log=f"generate-{name}")
        greedy[name] = graded(answers, held)

    # ------------------------------------------------------------------ report
    grpo_held = read_predictions(run / "eval" / "predictions.csv", "finetuned")
    if sorted(grpo_held) != sorted(held) or any(grpo_held[i]["label"] != held[i]["label"] for i in held):
        sys.exit("the two evals scored different held-out reviews; compare nothing")
    ids = sorted(held)
    correct = {
        "sft": [held[i]["correct"] for i in ids],
        "grpo": [grpo_held[i]["correct"] for i in ids],
    }
    reward = {name: [greedy[name][i][0] for i in ids] for name in greedy}
    labels = {row["label"] for row in held.values()}
    is_label = {name: sum(greedy[name][i][1].strip() in labels for i in ids) for name in greedy}
    summary = json.loads((run / "manifest.json").read_text())["train"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    measured = {"SFT (3 verbs)": {"seconds": sft_seconds, "rss_gib": sft_rss}, **measured}
    report(args, table, sft["metrics"], correct, reward, is_label, summary, records, measured)
    print(f"\nwall time: {(time.perf_counter() - started) / 60:.1f} min; everything is in {work}")


def write_grpo_experiment(args, work: Path) -> Path:
    """The GRPO experiment beside the SFT one: the same template, label and training part; init_adapter the SFT."""
    sft = json.loads((work / "sft" / "outcome.yaml").read_text())
    folder = work / "grpo"
    folder.mkdir(parents=True, exist_ok=True)
    experiment = folder / "grpo.yaml"
    data = {**sft["data"], "train": str(work / "sft" / sft["data"]["train"]), "valid_split": 0.0}
    experiment.write_text(
        json.dumps(
            {  # JSON is YAML
                "name": "grpo-outcome",
                "seed": args.seed,
                "data": data,  # no valid split: each GRPO evaluation samples every valid prompt, minutes on a CPU
                "train": {
                    "method": "grpo",
                    "init_adapter": str(work / "sft" / "run"),
                    "max_steps": args.grpo_steps,
                    "grpo": {
                        "generations": args.generations,
                        "max_completion_tokens": args.max_completion_tokens,
                        "temperature": args.temperature,
                        "beta": args.beta,
                        "loss_type": args.loss_type,
                        "grader": GRADER,
                    },
                },
                "eval": {**sft["eval"], "data": str(work / "sft" / sft["eval"]["data"]), "systems": ["finetuned"]},
            },
            indent=2,
        )
    )
    return experiment


def run_verb(verb: str, experiment: Path, run: Path, extra: list[str], log: str = "", watch=None) -> dict:
    """`tuneforge <verb>` in its own process, its output in <run>/../<log or verb>.log; its seconds and peak RSS
    (GiB). `watch`: called every few seconds, returns a progress line to print when there is news."""
    log = run.parent / f"{log or verb}.log"
    command = [sys.executable, "-m", "tuneforge", verb, str(experiment), "--run-dir", str(run), *extra]
    started = last_line = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # wait4: this child's own peak memory
            if pid:
                break
            time.sleep(5)
            news = watch() if watch else None
            if news or time.perf_counter() - last_line >= HEARTBEAT_S:
                print(f"  [{time.perf_counter() - started:5.0f} s] {news or verb + ' running'}", flush=True)
                last_line = time.perf_counter()
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace").replace("\r", "\n")
    lines = [line for line in text.splitlines() if line.strip() and "%|" not in line]
    if process.returncode:
        sys.exit(f"tuneforge {verb} failed ({process.returncode}); {log}:\n" + "\n".join(lines[-40:]))
    print(f"\n$ tuneforge {verb}  ({seconds:.0f} s)\n" + "\n".join(f"  {line}" for line in lines[-10:]), flush=True)
    return {"seconds": seconds, "rss_gib": usage.ru_maxrss / 2**20, "log": log}


def trl_step_logs(log: Path) -> list[dict[str, float]]:
    """TRL's per-step log dicts as the train verb printed them: they hold what metrics.jsonl leaves out, the share of
    groups whose completions all scored the same (`frac_reward_zero_std`) and the step's time (`step_time`)."""
    import ast

    steps = []
    for line in log.read_text(errors="replace").replace("\r", "\n").splitlines():
        if line.startswith("{") and "'frac_reward_zero_std'" in line:
            steps.append({k: float(v) for k, v in ast.literal_eval(line.strip()).items()})
    return steps


class GRPOProgress:
    """The newest GRPO step in the run's metrics.jsonl, once per step."""

    def __init__(self, run: Path, steps: int):
        self.path, self.steps, self.shown = run / "metrics.jsonl", steps, 0

    def __call__(self) -> str | None:
        if not self.path.exists():
            return None
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "reward" in r]
        if not rows or rows[-1]["step"] == self.shown:
            return None
        last = rows[-1]
        self.shown = last["step"]
        return (
            f"GRPO step {last['step']}/{self.steps}: reward {last['reward']:.3f}, "
            f"reward_std over the step {last.get('reward_std', 0):.3f}, kl {last.get('kl', 0):.4f}, "
            f"loss {last.get('loss', 0):.4f}"
        )


def read_predictions(path: Path, system: str) -> dict[str, dict]:
    """eval's predictions.csv for one system: {id: {messages, label, correct}}."""
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["system"] == system]
    return {
        r["id"]: {"messages": json.loads(r["prompt"]), "label": r["label"], "correct": r["correct"] == "True"}
        for r in rows
    }


def graded(answers: Path, held: dict[str, dict]) -> dict[str, tuple[float, str]]:
    """{id: (reward, answer)}: each greedy answer graded as GRPO's reward function grades a completion."""
    from tuneforge.graders import grade

    scores = {}
    for line in answers.read_text().splitlines():
        row = json.loads(line)
        item = {"label": held[row["id"]]["label"]}
        scores[row["id"]] = (float(grade(GRADER, {"output_text": row["answer"].strip()}, item).score), row["answer"])
    return scores


def report(args, table, metrics, correct, reward, is_label, summary, records, measured) -> None:
    """The side-by-side table, the verdicts, GRPO's training figures and each process's time and memory."""
    import numpy as np

    from tuneforge.eval.scores import bootstrap_interval
    from tuneforge.feedback.summary import wilson

    n = len(correct["sft"])
    print(
        f"\n{args.preset}: {Path(table).name}, seed {args.seed}, {n} held-out reviews; "
        f"GRPO {summary['steps']} steps x {summary['plan']['batch_size']} prompts x {summary['generations']} "
        f"completions, lr {summary['plan']['lr']:g}, beta {summary['beta']}, {summary['loss_type']} loss, "
        f"temperature {args.temperature}, at most {args.max_completion_tokens} tokens"
    )
    head = f"{'held-out (95% interval)':<30}  {'SFT':>21}  {'GRPO':>21}  {'GRPO - SFT (paired)':>25}  {'GRPO/SFT':>8}"
    print("\n" + head + "\n" + "-" * len(head))
    verdicts = []
    for label, values in (("accuracy (label likelihood)", correct), ("greedy string_check reward", reward)):
        a, b = np.asarray(values["sft"], dtype=float), np.asarray(values["grpo"], dtype=float)
        cells = []
        for v in (a, b):
            low, high = wilson(v.sum(), n)
            cells.append(f"{v.mean():.3f} [{low:.3f}, {high:.3f}]")
        low, high = bootstrap_interval(b - a, args.seed)
        diff = f"{b.mean() - a.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
        ratio = f"{b.mean() / a.mean():.3f}" if a.mean() else "-"
        print(f"{label:<30}  {cells[0]:>21}  {cells[1]:>21}  {diff:>25}  {ratio:>8}")
        better, worse = int(((b == 1) & (a == 0)).sum()), int(((a == 1) & (b == 0)).sum())
        verdict = "improved" if low > 0 else "got worse" if high < 0 else "did not change beyond chance"
        verdicts.append(f"{label}: GRPO {verdict} (right only for GRPO {better}, only for SFT {worse})")
    print(f"{'majority floor (accuracy)':<30}  {metrics['majority']['accuracy']:>21.3f}")
    print()
    for line in verdicts:
        print(line)

    steps = [r for r in records if "reward" in r]
    trl = trl_step_logs(measured["train"]["log"])
    step_times = [r["step_time"] for r in trl if "step_time" in r]
    print(
        f"\nGRPO training:\n"
        f"  {summary['seconds'] / max(summary['steps'], 1):.1f} s a step ({summary['seconds']:.0f} s for "
        f"{summary['steps']} steps in the trainer loop; the verb took {measured['train']['seconds']:.0f} s with "
        f"loading and saving); TRL's step_time median {np.median(step_times):.1f} s "
        f"[{min(step_times):.1f}, {max(step_times):.1f}]\n"
        f"  step reward {steps[0]['reward']:.3f} at step 1, {steps[-1]['reward']:.3f} at the last, "
        f"mean {np.mean([r['reward'] for r in steps]):.3f} over {len(steps)} steps\n"
        f"  groups whose {summary['generations']} completions all scored the same (no gradient from them): "
        f"{np.mean([r['frac_reward_zero_std'] for r in trl]):.0%} over the run, "
        f"{trl[-1]['frac_reward_zero_std']:.0%} at the last step\n"
        f"  kl at the last step {steps[-1].get('kl', 0):.4f}; grader errors {summary['grader_errors']} "
        f"of {summary['graded']} completions"
    )
    print(f"greedy answers that are a label, right or wrong: SFT {is_label['sft']}/{n}, GRPO {is_label['grpo']}/{n}")
    print(f"\n{'process':<20}  {'seconds':>8}  {'peak RSS GiB':>12}")
    for name, figures in measured.items():
        name = name if name.startswith("SFT") else f"GRPO run: {name}"
        print(f"{name:<20}  {figures['seconds']:>8.0f}  {figures['rss_gib']:>12.2f}")


if __name__ == "__main__":
    main()
