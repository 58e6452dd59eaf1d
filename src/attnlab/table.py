"""The paper's Table 1 from `attnlab eval` results: Markdown for reading, CSV for everything else.

Rows: the reference rows (random guess, majority class), then standard, then each variant under
uniform, hybrid and skip (paper Table 1), then anything else. Columns: the tasks the results hold, in the
paper's order (seven NLU accuracies, their average, WikiText word perplexity, LAMBADA perplexity and
accuracy), then attnlab's offline tasks, then other tasks by name. Accuracies are percentages with the
harness's standard error; perplexities are shown plain (the paper writes very large ones as 9E+4).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import MIXER_NAMES
from .evaluation import PAPER_NLU_TASKS


@dataclass(frozen=True)
class Column:
    task: str
    metric: str  # harness metric name, e.g. "acc" (read as "acc,none")
    header: str

    @property
    def is_accuracy(self) -> bool:
        return self.metric.startswith("acc")


KNOWN_COLUMNS = (
    Column("arc_easy", "acc", "ARC-e"),
    Column("boolq", "acc", "BoolQ"),
    Column("copa", "acc", "COPA"),
    Column("piqa", "acc", "PIQA"),
    Column("sciq", "acc", "SciQ"),
    Column("rte", "acc", "RTE"),
    Column("hellaswag", "acc", "HellaSwag"),
    Column("wikitext", "word_perplexity", "WikiText ppl"),
    Column("lambada_openai", "perplexity", "LAMBADA ppl"),
    Column("lambada_openai", "acc", "LAMBADA acc"),
    Column("lastword", "acc", "lastword acc"),
    Column("lastword", "perplexity", "lastword ppl"),
    Column("cloze", "acc", "cloze acc"),
    Column("cloze", "acc_norm", "cloze acc_norm"),
    Column("heldout", "word_perplexity", "held-out word ppl"),
)
NLU_AVERAGE = "NLU avg"
# Metrics tried, in order, for a task the table does not know.
_FALLBACK_METRICS = ("acc", "acc_norm", "exact_match", "word_perplexity", "perplexity")

# Reference rows, in percent. Random guess: one over the number of choices (ARC-Easy has mostly four;
# an exact word match by chance is ~0). Majority class: the commoner label of the binary tasks in the
# splits the harness evaluates: BoolQ validation 2033 of 3270 true, RTE validation 146 of 277 entailment,
# COPA validation 55 of 100 first choice, PIQA validation 928 of 1838 second solution.
RANDOM_GUESS = {
    "arc_easy": 25.0,
    "boolq": 50.0,
    "copa": 50.0,
    "piqa": 50.0,
    "sciq": 25.0,
    "rte": 50.0,
    "hellaswag": 25.0,
    "lambada_openai": 0.0,
    "lastword": 0.0,
    "cloze": 25.0,
}
MAJORITY_CLASS = {"boolq": 100 * 2033 / 3270, "rte": 100 * 146 / 277, "copa": 55.0, "piqa": 100 * 928 / 1838}
GROUPS = ("reference", "standard", "uniform", "hybrid", "skip", "mixed")


@dataclass
class Row:
    group: str
    label: str
    record: dict | None  # None for the reference rows


def row_for(record: dict) -> Row:
    meta = record["attnlab"]
    if meta["skip_nonstandard"] and meta["kind"] != "standard":
        return Row("skip", meta["mixer"], record)
    return Row(meta["kind"], meta["mixer"], record)


def table_columns(records: Sequence[dict]) -> list[Column]:
    tasks = {task for record in records for task in record.get("results", {})}
    columns = [column for column in KNOWN_COLUMNS if column.task in tasks]
    known_tasks = {column.task for column in KNOWN_COLUMNS}
    for task in sorted(tasks - known_tasks):
        metrics = {key.split(",")[0] for record in records for key in record.get("results", {}).get(task, {})}
        metric = next((m for m in _FALLBACK_METRICS if m in metrics), None)
        if metric is not None:
            columns.append(Column(task, metric, f"{task} {metric}"))
    if any(column.task in PAPER_NLU_TASKS for column in columns):
        last_nlu = max(i for i, column in enumerate(columns) if column.task in PAPER_NLU_TASKS)
        present = ",".join(column.task for column in columns if column.task in PAPER_NLU_TASKS)
        columns.insert(last_nlu + 1, Column(present, "", NLU_AVERAGE))  # the average of the NLU columns shown
    return columns


def ordered_rows(records: Sequence[dict]) -> list[Row]:
    """Reference rows, then records by group (Table 1 order) and mixer (registry order)."""
    mixer_order = {name: i for i, name in enumerate(MIXER_NAMES)}
    rows = sorted(
        (row_for(record) for record in records),
        key=lambda row: (GROUPS.index(row.group), mixer_order.get(row.label, len(mixer_order)), row.label),
    )
    labels = [(row.group, row.label) for row in rows]
    for row in rows:  # the same variant twice in a group: tell the rows apart by checkpoint
        if labels.count((row.group, row.label)) > 1:
            row.label = f"{row.label} ({Path(row.record['attnlab']['checkpoint']).name})"
    return [Row("reference", "random guess", None), Row("reference", "majority class", None), *rows]


def cell_value(row: Row, column: Column) -> tuple[float | None, float | None]:
    """(value, stderr) of a cell; accuracies in percent; None where there is nothing to show."""
    if row.record is None:
        table = RANDOM_GUESS if row.label == "random guess" else MAJORITY_CLASS
        if column.header == NLU_AVERAGE:
            values = [table.get(task) for task in column.task.split(",")]
            return (sum(values) / len(values), None) if None not in values else (None, None)
        return (table.get(column.task), None) if column.is_accuracy else (None, None)
    results = row.record.get("results", {})
    if column.header == NLU_AVERAGE:
        values = [results[t]["acc,none"] for t in column.task.split(",") if "acc,none" in results.get(t, {})]
        return (100 * sum(values) / len(values), None) if values else (None, None)
    metrics = results.get(column.task, {})
    value, stderr = metrics.get(f"{column.metric},none"), metrics.get(f"{column.metric}_stderr,none")
    if not isinstance(value, (int, float)):
        return None, None
    stderr = stderr if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    if column.is_accuracy:
        return 100 * value, (100 * stderr if stderr is not None else None)
    return value, stderr


def format_cell(value: float | None, stderr: float | None, accuracy: bool) -> str:
    if value is None:
        return "–"
    if not math.isfinite(value):
        return str(value)
    if accuracy:
        return f"{value:.1f} ± {stderr:.1f}" if stderr is not None else f"{value:.1f}"
    if value >= 1e4:
        return f"{value:.0E}".replace("E+0", "E+")
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def markdown_table(records: Sequence[dict]) -> str:
    columns = table_columns(records)
    rows = ordered_rows(records)
    lines = [
        "| group | model | " + " | ".join(column.header for column in columns) + " |",
        "|---|---|" + "---:|" * len(columns),
    ]
    for row in rows:
        cells = [
            format_cell(*cell_value(row, column), column.is_accuracy or column.header == NLU_AVERAGE)
            for column in columns
        ]
        if row.record is None and set(cells) <= {"–"}:
            continue  # a reference row with nothing to say about these tasks
        lines.append(f"| {row.group} | {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(records: Sequence[dict]) -> str:
    """Every cell with its stderr in its own column, plus checkpoint, parameters and layer pattern."""
    columns = table_columns(records)
    output = io.StringIO()
    writer = csv.writer(output, lineterminator="\n")
    header = ["group", "model", "checkpoint", "parameters", "mixer_types"]
    for column in columns:
        header += [column.header, f"{column.header} stderr"]
    writer.writerow(header)
    for row in ordered_rows(records):
        meta = row.record["attnlab"] if row.record else {}
        line = [
            row.group,
            row.label,
            meta.get("checkpoint", ""),
            meta.get("parameters", ""),
            ",".join(meta.get("mixer_types", [])),
        ]
        for column in columns:
            value, stderr = cell_value(row, column)
            line += ["" if value is None else repr(value), "" if stderr is None else repr(stderr)]
        writer.writerow(line)
    return output.getvalue()


def ppl_context_table(records: Sequence[dict]) -> str:
    """Word perplexity by context length (paper Table 4) for the records that measured it; "" if none."""
    measured = [row for row in ordered_rows(records) if row.record and "ppl_contexts" in row.record]
    if not measured:
        return ""
    contexts = sorted({int(c) for row in measured for c in row.record["ppl_contexts"]["by_context"]})
    lines = [
        "| group | model | " + " | ".join(f"ctx {c}" for c in contexts) + " |",
        "|---|---|" + "---:|" * len(contexts),
    ]
    for row in measured:
        by_context = row.record["ppl_contexts"]["by_context"]
        cells = [format_cell(by_context.get(str(c), {}).get("word_perplexity"), None, False) for c in contexts]
        lines.append(f"| {row.group} | {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
