"""The paper's Table 1 from `attnlab eval` results: Markdown for reading, CSV for everything else.

Rows: the reference rows (random guess, majority class), then standard, then each variant under
uniform, hybrid and skip (paper Table 1), then anything else. Columns: the tasks the results hold, in the
paper's order (seven NLU accuracies, their average, WikiText word perplexity, LAMBADA perplexity and
accuracy), then attnlab's offline tasks, then other tasks by name. Accuracies are percentages with the
harness's standard error; perplexities are shown plain (the paper writes very large ones as 9E+4).

Only records written by `attnlab eval` are laid out: `load_table_records` reads results files and refuses,
in one line naming the file, anything else (a recall result, a file missing the fields the table reads).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import checkpoint_labels
from .evaluation import PAPER_NLU_TASKS, load_records
from .mixers import mixer_names


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


# What `attnlab eval` writes in every record's "attnlab" block and the table reads.
REQUIRED_METADATA = ("checkpoint", "kind", "mixer", "skip_nonstandard")


def is_recall_record(record: object) -> bool:
    """Whether `record` is what `attnlab recall --out` writes (`evaluation.evaluate_recall`): a top-level task
    spec, accuracy and chance level beside the `attnlab` block, and no harness `results`."""
    return (
        isinstance(record, dict)
        and "results" not in record
        and all(key in record for key in ("task", "accuracy", "chance"))
    )


def check_record(record: object, source: str) -> None:
    """Refuse, with one line naming `source` (a file name), a record that Table 1 cannot show.

    A record of `attnlab eval` has an `attnlab` block with `REQUIRED_METADATA` (its kind one of the table's
    groups) and `results` (task → metric → value) and/or `ppl_contexts` (`by_context`: length → metrics).
    A recall result (`attnlab recall`) is refused by name: it has no harness tasks to lay out.
    """
    not_eval = f"{source} is not a results file written by `attnlab eval`"
    if is_recall_record(record):
        raise ValueError(
            f"{source} is a recall result written by `attnlab recall` (task {record['task']!r}, accuracy "
            f"{record['accuracy']!r}); attnlab table lays out results files written by `attnlab eval`"
        )
    meta = record.get("attnlab") if isinstance(record, dict) else None
    missing = [key for key in REQUIRED_METADATA if key not in meta] if isinstance(meta, dict) else None
    if missing is None:
        raise ValueError(f"{not_eval} (it has no 'attnlab' block)")
    if missing:
        raise ValueError(f"{not_eval} (its 'attnlab' block lacks {', '.join(repr(key) for key in missing)})")
    kind = record["attnlab"]["kind"]
    if kind not in GROUPS[1:]:
        raise ValueError(f"{not_eval} (its model kind {kind!r} is none of {', '.join(GROUPS[1:])})")
    if "results" not in record and "ppl_contexts" not in record:
        raise ValueError(f"{not_eval} (it has neither 'results' nor 'ppl_contexts')")
    results = record.get("results", {})
    if not isinstance(results, dict) or not all(isinstance(metrics, dict) for metrics in results.values()):
        raise ValueError(f"{not_eval} (its 'results' is not a mapping of task to metrics)")
    if "ppl_contexts" in record:
        by_context = record["ppl_contexts"].get("by_context") if isinstance(record["ppl_contexts"], dict) else None
        if not isinstance(by_context, dict) or not all(
            str(context).isdigit() and isinstance(metrics, dict) for context, metrics in by_context.items()
        ):
            raise ValueError(f"{not_eval} (its 'ppl_contexts' has no 'by_context' mapping of length to metrics)")


def check_records(records: Sequence[object], source: str) -> list[dict]:
    """`records` (those of one results file, `source`) after `check_record`; the file is named in errors,
    with the record's position when the file holds several."""
    for index, record in enumerate(records):
        check_record(record, source if len(records) == 1 else f"{source} (record {index + 1} of {len(records)})")
    return list(records)


def load_table_records(paths: Sequence[str | Path]) -> list[dict]:
    """The records of results files written by `attnlab eval` (`evaluation.load_records`), each checked by
    `check_record`; a file that is not one is a one-line ValueError naming it, before anything is printed."""
    return [record for path in paths for record in check_records(load_records(path), str(path))]


def _check_unnamed(records: Sequence[object]) -> None:
    """`check_record` for records whose file is not known here (callers that did not use `load_table_records`)."""
    for record in records:
        meta = record.get("attnlab") if isinstance(record, dict) else None
        checkpoint = meta.get("checkpoint") if isinstance(meta, dict) else None
        check_record(record, f"the record of {checkpoint}" if checkpoint else "a record given to the table")


def row_for(record: dict) -> Row:
    """The group and label of an `attnlab eval` record: its kind and mixer, or "skip" for a skip-mode variant."""
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
    """Reference rows, then records by group (Table 1 order) and mixer (registry order).

    The same variant more than once in a group is told apart by checkpoint (`checkpoint.checkpoint_labels`: the
    folder name, with its parent folder where that differs, else `#1`, `#2`, ... in the order given), so
    every row's (group, label) is unique.
    """
    _check_unnamed(records)
    mixer_order = {name: i for i, name in enumerate(mixer_names())}
    rows = sorted(
        (row_for(record) for record in records),
        key=lambda row: (GROUPS.index(row.group), mixer_order.get(row.label, len(mixer_order)), row.label),
    )
    keys = [(row.group, row.label) for row in rows]
    for key in dict.fromkeys(keys):
        same = [row for row in rows if (row.group, row.label) == key]
        if len(same) > 1:
            names = checkpoint_labels([str(row.record["attnlab"]["checkpoint"]) for row in same])
            for row, name in zip(same, names):
                row.label = f"{row.label} ({name})"
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


def markdown_lines(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table: `headers`, a separator with one cell per header (the first two left-aligned, the
    rest right-aligned), and `rows`, each with exactly as many cells as there are headers."""
    if any(len(cells) != len(headers) for cells in rows):
        raise AssertionError(f"a row has other than {len(headers)} cells")
    separator = "|" + "".join("---|" if index < 2 else "---:|" for index in range(len(headers)))
    lines = ["| " + " | ".join(headers) + " |", separator, *("| " + " | ".join(cells) + " |" for cells in rows)]
    return "\n".join(lines) + "\n"


def markdown_table(records: Sequence[dict]) -> str:
    """Table 1 in Markdown: the reference rows that have something to show, then one row per record.

    "" when the records hold no task column (e.g. perplexity by context only: `ppl_context_table` shows
    those); a ValueError when they hold neither a task column nor perplexity by context.
    """
    ordered = ordered_rows(records)  # checks the records first
    columns = table_columns(records)
    if not columns:
        if any("ppl_contexts" in record for record in records):
            return ""
        tasks = sorted({task for record in records for task in record.get("results", {})})
        raise ValueError(
            "the results hold no task metric the table can show "
            f"(tasks: {', '.join(tasks) or 'none'}; metrics read: {', '.join(_FALLBACK_METRICS)})"
        )
    rows = []
    for row in ordered:
        cells = [
            format_cell(*cell_value(row, column), column.is_accuracy or column.header == NLU_AVERAGE)
            for column in columns
        ]
        if row.record is None and set(cells) <= {"–"}:
            continue  # a reference row with nothing to say about these tasks
        rows.append([row.group, row.label, *cells])
    return markdown_lines(["group", "model", *(column.header for column in columns)], rows)


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
    if not contexts:
        return ""
    rows = []
    for row in measured:
        by_context = row.record["ppl_contexts"]["by_context"]
        values = [by_context.get(str(c), {}).get("word_perplexity") for c in contexts]
        cells = [format_cell(v if isinstance(v, (int, float)) else None, None, False) for v in values]
        rows.append([row.group, row.label, *cells])
    return markdown_lines(["group", "model", *(f"ctx {c}" for c in contexts)], rows)
