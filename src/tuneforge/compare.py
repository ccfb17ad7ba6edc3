"""`tuneforge compare RUN...`: several runs (or a sweep's points) in one report.

    compare.json   every figure below, for scripts
    compare.md     the tables, for a terminal or a pull request
    compare.html   the tables and charts in one file
    curves.png     training loss and the valid metric of every run, overlaid by epoch
    metrics.png    the ranking metric of every run with its 95% interval
    best.yaml      the best run's experiment, its paths made absolute, ready for `tuneforge run`

Each run is described by the settings in which the runs differ, its training (steps, time, tokens, cost when
hosted), its eval metrics with intervals, and its judge verdicts. Runs scored on different eval examples are
flagged: their numbers are not side by side comparable.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, read_jsonl
from tuneforge.errors import TuneforgeError

HEADLINE = {
    "classification": ("accuracy", "macro_f1", "roc_auc"),
    "generation": ("similarity", "quality", "answering", "rouge_l", "bleu", "perplexity", "tool_call"),
}
PATH_KEYS = (
    ("data", "train"),
    ("data", "valid"),
    ("eval", "data"),
    ("rag", "corpus"),
    ("train", "init_adapter"),
    ("model", "ref"),
)


@dataclass
class Run:
    label: str
    path: Path
    config: dict
    manifest: dict
    curve: list[dict]
    metrics: dict
    point: dict = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.point.get("status"):
            return self.point["status"]
        return "evaluated" if self.metrics else "trained" if self.manifest.get("train") else "not trained"

    @property
    def eval_set(self) -> str | None:
        return (self.manifest.get("eval") or {}).get("eval_set")

    def value(self, system: str, metric: str) -> float | None:
        found = (self.metrics.get(system) or {}).get(metric)
        return found if isinstance(found, (int, float)) else None


def _json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as exc:
        raise TuneforgeError(f"{path}: not valid JSON (line {exc.lineno}); was it written by another tool?") from None


def _read_run(path: Path, label: str) -> Run:
    import yaml

    config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    return Run(
        label,
        path,
        config,
        _json(path / "manifest.json", {}),
        read_jsonl(path / "metrics.jsonl"),
        _json(path / "eval" / "metrics.json", {}),
        _json(path / "point.json", {}),
    )


def load_runs(paths: list[Path]) -> tuple[list[Run], dict]:
    """The runs named (a sweep folder stands for its points), and the first sweep's ranking ({metric, goal, source})."""
    runs, sweep = [], {}
    for given in paths:
        path = Path(given)
        state = _json(path / "sweep.json") if path.is_dir() else None
        if state:
            sweep = sweep or state
            points = [path / p["slug"] for p in state.get("points", []) if (path / p["slug"] / "config.yaml").exists()]
            if not points:
                raise TuneforgeError(f"{path}: a sweep folder, but none of its points has run yet")
            runs += [_read_run(p, p.name) for p in points]
        elif (path / "config.yaml").exists():
            runs.append(_read_run(path, path.name))
        else:
            raise TuneforgeError(f"{path}: not a run folder (no config.yaml) nor a sweep folder (no sweep.json)")
    names = [r.label for r in runs]
    for run in runs:
        if names.count(run.label) > 1:
            run.label = f"{run.path.parent.name}/{run.path.name}"
    if len({r.path.resolve() for r in runs}) < len(runs):
        raise TuneforgeError("the same run is named twice")
    return runs, sweep


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def differing(runs: list[Run]) -> list[str]:
    """The settings in which the runs differ (a key some runs lack counts as differing)."""
    configs = [flat(r.config) for r in runs]
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if k != "name" and len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]


def _mode(runs: list[Run]) -> str:
    modes = {(r.manifest.get("eval") or {}).get("mode") for r in runs} - {None}
    if not modes:
        modes = {
            "classification"
            if any("accuracy" in m for r in runs for m in r.metrics.values() if isinstance(m, dict))
            else "generation"
        }
    return "classification" if "classification" in modes else "generation"


def _ranking(runs: list[Run], sweep: dict, metric: str | None, goal: str | None) -> tuple[str, str, str]:
    name = (
        metric
        or sweep.get("metric")
        or ("finetuned.accuracy" if _mode(runs) == "classification" else "finetuned.similarity")
    )
    system, _, metric_name = name.rpartition(".")
    system = system or "finetuned"
    goal = goal or (sweep.get("goal") if not metric else None) or ("min" if metric_name == "perplexity" else "max")
    return system, metric_name, goal


def _cost(run: Run) -> dict:
    train = run.manifest.get("train") or {}
    job = run.manifest.get("openai_job") or {}
    out = {
        "steps": train.get("steps"),
        "train_seconds": train.get("seconds"),
        "supervised_tokens": train.get("supervised_tokens"),
        "eval_seconds": round(
            sum(m.get("seconds", 0.0) for m in run.metrics.values() if isinstance(m, dict) and "seconds" in m), 1
        )
        if run.metrics
        else None,
        "hosted_usd": None,
        "device": train.get("device"),
    }
    if job.get("trained_tokens"):
        price = (run.config.get("train") or {}).get("price_per_1m_tokens", 0.0)
        out["hosted_usd"] = round(job["trained_tokens"] * price / 1e6, 4)
        out["trained_tokens"] = job["trained_tokens"]
    return out


def _interval(metrics: dict, metric: str) -> list[float] | None:
    low, high = metrics.get(f"{metric}_low"), metrics.get(f"{metric}_high")
    return [low, high] if low is not None and high is not None else None


def summarise(runs: list[Run], sweep: dict, metric: str | None = None, goal: str | None = None) -> dict:
    """Every figure of the report, as compare.json holds it."""
    system, metric_name, goal = _ranking(runs, sweep, metric, goal)
    mode = _mode(runs)
    keys = differing(runs)
    systems = list(dict.fromkeys(s for r in runs for s, m in r.metrics.items() if s != "judge" and isinstance(m, dict)))
    sets = {r.label: r.eval_set for r in runs}
    groups = sorted({s for s in sets.values() if s})
    rows = []
    for run in runs:
        settings = flat(run.config)
        rows.append(
            {
                "run": run.label,
                "path": str(run.path),
                "status": run.status,
                "settings": {k: settings.get(k) for k in keys},
                "value": run.value(system, metric_name),
                "interval": _interval(run.metrics.get(system) or {}, metric_name),
                "metrics": {
                    s: {k: v for k, v in m.items() if k != "confusion"} for s, m in run.metrics.items() if s != "judge"
                },
                "judge": (run.metrics.get("judge") or {}).get("pairs"),
                "eval_set": sets[run.label],
                "eval_group": groups.index(sets[run.label]) + 1 if sets[run.label] else None,
                "training": _cost(run),
                "stopped": run.point.get("reason") if run.status == "stopped" else None,
                "final_eval_loss": (run.manifest.get("train") or {}).get("final_eval_loss"),
            }
        )
    ranked = [row for row in rows if row["value"] is not None]
    best = None
    if ranked:  # a tie goes to the lower final valid loss, then to the run named first
        sign = -1 if goal == "max" else 1
        best_row = min(
            ranked,
            key=lambda row: (
                sign * row["value"],
                row["final_eval_loss"] if row["final_eval_loss"] is not None else float("inf"),
            ),
        )
        best = {"run": best_row["run"], "value": best_row["value"], "path": best_row["path"]}
    return {
        "metric": f"{system}.{metric_name}",
        "system": system,
        "goal": goal,
        "mode": mode,
        "differing": keys,
        "systems": systems,
        "eval_sets": len(groups),
        "runs": rows,
        "best": best,
        "source": sweep.get("source"),
    }


def best_config(run: Run, overrides: dict | None = None) -> str:
    """The run's experiment with relative paths made absolute against the file it came from, as YAML."""
    import yaml

    config = json.loads(json.dumps(run.config))
    source = run.manifest.get("source")
    base = Path(source).parent if source else None
    for section, key in PATH_KEYS:
        value = (config.get(section) or {}).get(key) if isinstance(config.get(section), dict) else None
        if not isinstance(value, str) or base is None or Path(value).expanduser().is_absolute():
            continue
        if value == "train" and section == "rag" or value.startswith("builtin:"):
            continue
        candidate = base / value
        if candidate.exists() or any(ch in value for ch in "*?[") and candidate.parent.exists():
            config[section][key] = str(candidate.resolve()) if candidate.exists() else str(candidate)
    config.pop("sweep", None)
    header = f"# the best run of `tuneforge compare`: {run.path}\n"
    if source:
        header += (
            f"# from {source}"
            + (" with " + " ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")
            + "\n"
        )
    return header + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


# --------------------------------------------------------------------------- charts


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _plt().close(figure)
    return buffer.getvalue()


def curves_chart(runs: list[Run]) -> bytes | None:
    """Train loss (a moving average over 5 logs) and the valid metric per evaluation, every run on the same axes."""
    plt = _plt()
    if not any("loss" in r for run in runs for r in run.curve):
        return None
    panels = [("loss", "Train loss (moving average of 5 logs)"), ("eval_loss", "Valid loss at each evaluation")]
    if any("eval_accuracy" in r for run in runs for r in run.curve):
        panels.append(("eval_accuracy", "Valid accuracy at each evaluation"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for n, run in enumerate(runs):
        look = {
            "color": colours[n % len(colours)],
            "linestyle": styles[n % len(styles)],
            "label": run.label,
        }  # overlaps stay visible
        for ax, (key, _) in zip(axes, panels):
            points = [(r["epoch"], r[key]) for r in run.curve if key in r and (key != "loss" or r.get("step", 0) > 0)]
            if not points:
                continue
            xs, ys = zip(*points)
            if key == "loss":
                ys = [sum(ys[max(0, i - 4) : i + 1]) / len(ys[max(0, i - 4) : i + 1]) for i in range(len(ys))]
                ax.plot(xs, ys, linewidth=1.3, **look)
            else:
                ax.plot(xs, ys, marker="o", markersize=4, linewidth=1, **look)
    for ax, (key, title) in zip(axes, panels):
        ax.set(title=title, xlabel="epoch", ylabel=key.replace("eval_", "valid ").replace("_", " "))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(len(runs), 4),
        fontsize=8,
        bbox_to_anchor=(0.5, -0.08 * ((len(runs) + 3) // 4)),
    )
    return _png(figure)


def metrics_chart(summary: dict) -> bytes | None:
    rows = [row for row in summary["runs"] if row["value"] is not None]
    if not rows:
        return None
    plt = _plt()
    figure, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    best = (summary["best"] or {}).get("run")
    values = [row["value"] for row in rows]
    errors = (
        [[row["value"] - row["interval"][0] for row in rows], [row["interval"][1] - row["value"] for row in rows]]
        if all(row["interval"] for row in rows)
        else None
    )
    ax.barh(
        range(len(rows)),
        values,
        xerr=errors,
        color=["#2b8a3e" if row["run"] == best else "#74a9cf" for row in rows],
        capsize=3,
    )
    ax.set_yticks(range(len(rows)), [row["run"] for row in rows], fontsize=8)
    ax.invert_yaxis()
    base = {row["metrics"].get("base", {}).get(summary["metric"].rpartition(".")[2]) for row in rows} - {None}
    if len(base) == 1 and summary["system"] != "base":
        ax.axvline(base.pop(), color="crimson", linestyle="--", linewidth=1, label="base")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(
        f"{summary['metric']} ({'higher' if summary['goal'] == 'max' else 'lower'} is better; "
        "95% interval where eval gives one)"
    )
    ax.set_title("Eval metric by run (best in green)")
    return _png(figure)


# --------------------------------------------------------------------------- tables


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


Table = tuple[str, list[str], list[list[str]]]  # (title, header, rows)


def tables(summary: dict) -> list[Table]:
    """(title, header, rows) for each table of the report: runs, eval metrics, judge verdicts, time and cost."""
    found = [_runs_table(summary), _metrics_table(summary), _judge_table(summary), _cost_table(summary)]
    return [table for table in found if table is not None]


def _runs_table(summary: dict) -> Table:
    head = ["run", "status", *summary["differing"], summary["metric"], "95% interval"]
    body = []
    for row in summary["runs"]:
        mark = " (best)" if summary["best"] and row["run"] == summary["best"]["run"] else ""
        interval = f"{row['interval'][0]:.3f}-{row['interval'][1]:.3f}" if row["interval"] else "-"
        status = row["status"] + (f": {row['stopped']}" if row["stopped"] else "")
        settings = (_fmt(row["settings"].get(k)) for k in summary["differing"])
        body.append([row["run"] + mark, status, *settings, _fmt(row["value"]), interval])
    return "Runs and the settings they differ in", head, body


def _metrics_table(summary: dict) -> Table | None:
    columns = HEADLINE[summary["mode"]]
    body = []
    shared = _same_everywhere(summary)
    for system in shared:  # base, baselines: the same answers in every run, so one row
        values = next(row["metrics"][system] for row in summary["runs"] if system in row["metrics"])
        runs = sum(system in row["metrics"] for row in summary["runs"])
        body.append([f"all {runs} runs", system, *_cells(values, columns)])
    for row in summary["runs"]:
        for system, values in row["metrics"].items():
            if system not in shared:
                body.append([row["run"], system, *_cells(values, columns)])
    if not body:
        return None
    title = f"Eval metrics of every system ({summary['mode']}; 95% bootstrap interval in brackets)"
    return title, ["run", "system", *columns], body


def _judge_table(summary: dict) -> Table | None:
    judged = [(row, pair) for row in summary["runs"] for pair in row["judge"] or []]
    if not judged:
        return None
    head = ["run", "eval set", "pair", "wins", "ties", "losses", "win rate", "95% interval"]
    body = [
        [
            row["run"],
            _fmt(row["eval_group"]),
            f"{pair['first']} vs {pair['second']}",
            _fmt(pair["wins"]),
            _fmt(pair["ties"]),
            _fmt(pair["losses"]),
            f"{pair['win_rate']:.2f}",
            f"{pair['win_rate_low']:.2f}-{pair['win_rate_high']:.2f}",
        ]
        for row, pair in judged
    ]
    return "Judge verdicts (each pair asked in both orders)", head, body


def _cost_table(summary: dict) -> Table:
    head = [
        "run",
        "steps",
        "train s",
        "eval s",
        "supervised tokens",
        "hosted USD",
        "final valid loss",
        "eval set",
        "device",
    ]
    keys = ("steps", "train_seconds", "eval_seconds", "supervised_tokens", "hosted_usd")
    body = [
        [
            row["run"],
            *(_fmt(row["training"][key]) for key in keys),
            _fmt(row["final_eval_loss"]),
            _fmt(row["eval_group"]),
            _fmt(row["training"]["device"]),
        ]
        for row in summary["runs"]
    ]
    return "Time and cost", head, body


def _cells(values: dict, columns) -> list[str]:
    cells = []
    for column in columns:
        interval = _interval(values, column)
        cells.append(_fmt(values.get(column)) + (f" ({interval[0]:.3f}-{interval[1]:.3f})" if interval else ""))
    return cells


def _same_everywhere(summary: dict) -> list[str]:
    """Systems scored identically in every run that has them, on one eval set (seconds aside)."""
    if summary["eval_sets"] > 1 or len(summary["runs"]) < 2:
        return []
    same = []
    for system in summary["systems"]:
        found = [
            json.dumps({k: v for k, v in row["metrics"][system].items() if k != "seconds"}, sort_keys=True)
            for row in summary["runs"]
            if system in row["metrics"]
        ]
        if len(found) > 1 and len(set(found)) == 1 and system != summary["system"]:
            same.append(system)
    return same


def _notes(summary: dict) -> list[str]:
    notes = []
    if summary["eval_sets"] > 1:
        notes.append(
            f"The runs were evaluated on {summary['eval_sets']} different eval sets (column 'eval set'): "
            "compare metrics and judge verdicts only within one set."
        )
    if summary["best"]:
        notes.append(
            f"Best by {summary['metric']} ({summary['goal']}): {summary['best']['run']} "
            f"({summary['best']['value']:.4g}); "
            "its experiment is in best.yaml: tuneforge run best.yaml"
        )
    else:
        notes.append(f"No run has {summary['metric']} yet (evaluate them first), so there is no best run.")
    return notes


def markdown(summary: dict) -> str:
    lines = [f"# Comparison of {len(summary['runs'])} runs", ""] + [f"- {n}" for n in _notes(summary)] + [""]
    for title, head, body in tables(summary):
        lines += [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
        lines.append("")
    lines += ["Charts: curves.png (training), metrics.png (the ranking metric).", ""]
    return "\n".join(lines)


def page(summary: dict, charts: dict[str, bytes]) -> str:
    esc = html.escape
    parts = [f"<h1>Comparison of {len(summary['runs'])} runs</h1>"] + [f"<p>{esc(n)}</p>" for n in _notes(summary)]
    for n, (title, head, body) in enumerate(tables(summary)):
        parts.append(
            f"<h2>{esc(title)}</h2><table><tr>"
            + "".join(f"<th>{esc(h)}</th>" for h in head)
            + "</tr>"
            + "".join(
                "<tr"
                + (' class="best"' if summary["best"] and row[0].startswith(summary["best"]["run"] + " (best)") else "")
                + ">"
                + "".join(f"<td>{esc(c)}</td>" for c in row)
                + "</tr>"
                for row in body
            )
            + "</table>"
        )
        if n == 0:
            parts += [
                f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                for name, png in charts.items()
            ]
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}th{background:#f3f3f3}"
        "tr.best td{background:#e6f4ea;font-weight:bold}"
        "img{max-width:100%;margin:0.5em 0}"
    )
    return (
        '<!doctype html><html><head><meta charset="utf-8"><title>tuneforge compare</title>'
        f"<style>{style}</style></head>"
        f"<body>{''.join(parts)}</body></html>\n"
    )


def compare_runs(paths: list[Path], out: Path, metric: str | None = None, goal: str | None = None) -> dict:
    """Write the report into `out`; returns its figures (what compare.json holds)."""
    runs, sweep = load_runs(paths)
    summary = summarise(runs, sweep, metric, goal)
    charts = {
        name: png for name, png in (("curves.png", curves_chart(runs)), ("metrics.png", metrics_chart(summary))) if png
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, png in charts.items():
        atomic_write_bytes(out / name, png)
    if summary["best"]:
        best = next(r for r in runs if r.label == summary["best"]["run"])
        atomic_write_text(out / "best.yaml", best_config(best, best.point.get("values")))
        summary["best"]["config"] = str(out / "best.yaml")
        if best.point.get("values") and summary["source"]:
            summary["best"]["command"] = (
                "tuneforge run "
                + summary["source"]
                + " "
                + " ".join(
                    f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in best.point["values"].items()
                )
            )
    elif (out / "best.yaml").exists():
        (out / "best.yaml").unlink()  # a best run of an earlier comparison is not this one's
    atomic_write_json(out / "compare.json", summary)
    atomic_write_text(out / "compare.md", markdown(summary))
    atomic_write_text(out / "compare.html", page(summary, charts))
    return summary
