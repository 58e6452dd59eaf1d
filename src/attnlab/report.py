"""A study's `report.md` (issue 7): the Table-1-style table, figures, and the paper's claims checked.

Everything is read back from the folders the study wrote (`attnlab.study`; their layout: `attnlab.studyfolder`):
the harness results (`results.json`, `skip.json`), recall accuracies (`recall.json`, `recall-skip.json`),
training stage records (seconds, divergence) and the analyses' `indicators.json`. The claims section is computed from
those numbers by the `CLAIMS` functions, each of which states its thresholds; nothing in it is written by
hand. Missing numbers (a failed or unfinished run) show as "–" and turn a claim into "cannot tell"; a claim
about models the study does not train at all is listed once as not checked.

"Close to standard" (hybrids, placements) is a held-out perplexity within ×1.10 of standard's, or within
the spread of standard's seeds when the study trains replicates and they differ by more, and MQAR within
max(5, 2σ) points. A hybrid that is not close also gets its training-loss gap to standard in the middle
and at the end of training (same data in the same order), beside that of standard's own replicates: a gap
still narrowing would close with more tokens, a steady or widening one would not. A placement study
(`placements:<mixer>`) also gets a section that judges every trained layer list this way and names the
smallest evenly spread share of standard layers that rescues the mixer, with `figures/share_sweep.png`.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .config import resolve_layer_pattern
from .environment import versions
from .runconfig import write_text_atomic
from .studyfolder import STUDY_FILES, run_folder, share_pattern

AGREES, DISAGREES, CANNOT_TELL = "agrees", "disagrees", "cannot tell"
NOT_STUDIED = "not studied"  # the study trains none of the models a claim compares (e.g. a placement study)
NEAR_CHANCE_POINTS = 5.0  # an accuracy within max(this, 2 stderr) points of chance is "at chance"
WELL_ABOVE_POINTS = 25.0  # and this many points above it is "well above chance"
CLOSE_PPL_RATIO = 1.10  # "close to standard": held-out perplexity within 10 % …
CLOSE_ACC_POINTS = 5.0  # … and recall accuracy within max(this, 2 combined stderr) points
COLLAPSE_PPL_RATIO = 2.0  # "collapses": perplexity at least twice that of the model it came from
LASTWORD_CHANCE = 0.0  # percent: exact greedy continuation of an open vocabulary
CLOZE_CHANCE = 25.0  # percent: one ending of four
# Fractions of a corpus run's optimizer steps over which its training loss is averaged: the hybrid claim
# sets the gap to standard in the middle of training beside the gap at the end (same data, same order).
LOSS_WINDOWS = ((0.4, 0.5), (0.9, 1.0))
PREVIOUS_TOKEN_HEAD = 0.5  # a head whose previous-token score reaches this can host the previous-token step
RETRIEVAL_HEAD = 0.5  # a head whose MQAR retrieval score reaches this can host the retrieval step
RECALLS_PERCENT = 90.0  # an MQAR accuracy from which a model counts as recalling


@dataclass
class Measure:
    value: float | None = None
    stderr: float | None = None


@dataclass
class Row:
    """One row of the main table: a (kind, mixer) pair with its corpus and recall numbers."""

    group: str  # standard | uniform | hybrid | skip | a placement name
    mixer: str
    layers: str = ""
    seed: int | None = None  # set on a replicate: its group's model trained again with this seed
    heldout_ppl: Measure = field(default_factory=Measure)
    lastword: Measure = field(default_factory=Measure)  # accuracy, percent
    lastword_ppl: Measure = field(default_factory=Measure)  # perplexity of the target word (LAMBADA's other number)
    cloze: Measure = field(default_factory=Measure)  # accuracy, percent
    recall: Measure = field(default_factory=Measure)  # accuracy at query positions, percent
    recall_chance: float | None = None  # percent: uniform guessing over the answer tokens
    recall_floor: float | None = None  # percent: the better of chance and guessing among the context's values
    parameters: int | None = None
    train_seconds: float | None = None  # corpus run
    window_losses: tuple[float, ...] | None = None  # corpus training loss, nats/token, one per LOSS_WINDOWS
    recall_train_seconds: float | None = None
    notes: list[str] = field(default_factory=list)  # "diverged", "failed", …

    @property
    def label(self) -> str:
        name = self.mixer if self.group in ("uniform", "hybrid", "skip") else self.group
        return name if self.seed is None else f"{name} (seed {self.seed})"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _harness_measure(record: dict | None, task: str, metric: str, percent: bool) -> Measure:
    results = (record or {}).get("results", {}).get(task, {})
    value, stderr = results.get(f"{metric},none"), results.get(f"{metric}_stderr,none")
    scale = 100.0 if percent else 1.0
    value = float(value) * scale if isinstance(value, (int, float)) else None
    stderr = float(stderr) * scale if isinstance(stderr, (int, float)) else None
    return Measure(value, stderr)


def _fill_corpus(row: Row, folder: Path, results_file: str) -> None:
    record = _read_json(folder / STUDY_FILES / results_file)
    if record is None:
        row.notes.append(f"no {results_file}")
        return
    row.heldout_ppl = _harness_measure(record, "heldout", "word_perplexity", percent=False)
    row.lastword = _harness_measure(record, "lastword", "acc", percent=True)
    row.lastword_ppl = _harness_measure(record, "lastword", "perplexity", percent=False)
    row.cloze = _harness_measure(record, "cloze", "acc", percent=True)
    row.parameters = record.get("attnlab", {}).get("parameters")


def _fill_recall(row: Row, folder: Path, results_file: str) -> None:
    record = _read_json(folder / STUDY_FILES / results_file)
    if record is None:
        row.notes.append(f"no {results_file}")
        return
    stderr = record["stderr"] if record["stderr"] is not None else math.nan  # None: a single example
    row.recall = Measure(100.0 * record["accuracy"], 100.0 * stderr)
    row.recall_chance = 100.0 * record["chance"]
    row.recall_floor = 100.0 * max(record["chance"], record.get("context_guess", record["chance"]))


def _train_seconds(folder: Path, row: Row) -> float | None:
    record = _read_json(folder / STUDY_FILES / "stages" / "train.json")
    if record is None:
        return None
    if record.get("status") == "diverged":
        row.notes.append(f"{folder.name} diverged")
    return float(record["seconds"])


def window_losses(metrics: Path) -> tuple[float, ...] | None:
    """Mean training loss over each `LOSS_WINDOWS` share of a run's optimizer steps (None without metrics)."""
    from .plots import read_metrics

    try:
        losses = [record["loss"] for record in read_metrics(metrics) if "loss" in record]
    except ValueError:
        return None
    means = []
    for start, stop in LOSS_WINDOWS:
        first = int(start * len(losses))
        window = losses[first : max(int(stop * len(losses)), first + 1)]  # at least one step
        if not window:
            return None
        means.append(sum(window) / len(window))
    return tuple(means)


def collect_rows(out: Path, study) -> list[Row]:
    """Rows in study order: each (kind, mixer) once, with skip rows for runs evaluated with skip."""
    rows: dict[tuple[str, str], Row] = {}

    def row_for(group: str, run) -> Row:
        seed = run.train.get("seed") if run.replicate else None
        return rows.setdefault((group, run.mixer, seed), Row(group, run.mixer, run.layers, seed))

    for run in study.runs:
        folder = run_folder(out, run.name)
        row = row_for(run.kind, run)
        if run.data == "corpus":
            row.train_seconds = _train_seconds(folder, row)
            row.window_losses = window_losses(folder / "metrics.jsonl")
            _fill_corpus(row, folder, "results.json")
            if run.skip:
                skip = row_for("skip", run)
                _fill_corpus(skip, folder, "skip.json")
                skip.train_seconds = row.train_seconds
        else:
            row.recall_train_seconds = _train_seconds(folder, row)
            _fill_recall(row, folder, "recall.json")
            if run.skip:
                skip = row_for("skip", run)
                _fill_recall(skip, folder, "recall-skip.json")
                skip.recall_train_seconds = row.recall_train_seconds
    order = {"standard": 0, "uniform": 1, "hybrid": 2, "skip": 3}
    return sorted(rows.values(), key=lambda row: order.get(row.group, 4))  # stable: study order within a group


# --- the table -------------------------------------------------------------------------------------


def _cell(measure: Measure, digits: int = 1) -> str:
    if measure.value is None or not math.isfinite(measure.value):
        return "–" if measure.value is None else str(measure.value)

    def number(value: float) -> str:
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.1E}"

    return number(measure.value) + (f" ± {number(measure.stderr)}" if measure.stderr is not None else "")


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}"


def table_cells(row: Row) -> list[str]:
    return [
        row.group,
        row.label,
        _cell(row.heldout_ppl),
        _cell(row.lastword),
        _cell(row.lastword_ppl, digits=0),
        _cell(row.cloze),
        _cell(row.recall),
        "–" if row.parameters is None else f"{row.parameters / 1e6:.2f}M",
        _seconds(row.train_seconds),
        _seconds(row.recall_train_seconds),
    ]


HEADER = [
    "group",
    "model",
    "held-out word ppl",
    "lastword acc",
    "lastword ppl",
    "cloze acc",
    "MQAR acc",
    "params (corpus)",
    "train s (corpus)",
    "train s (MQAR)",
]


def markdown_table(rows: list[Row]) -> str:
    chance = next((row.recall_chance for row in rows if row.recall_chance is not None), None)
    floor = next((row.recall_floor for row in rows if row.recall_floor is not None), None)
    lines = ["| " + " | ".join(HEADER) + " |", "|---|---|" + "---:|" * (len(HEADER) - 2)]
    chance_recall = "–" if chance is None else f"{chance:.1f}"
    lines.append(
        f"| reference | random guess | – | {LASTWORD_CHANCE:.1f} | – | {CLOZE_CHANCE:.1f} | {chance_recall} "
        "| – | – | – |"
    )
    if floor is not None and floor != chance:
        lines.append(f"| reference | guess among the context's values | – | – | – | – | {floor:.1f} | – | – | – |")
    for row in rows:
        lines.append("| " + " | ".join(table_cells(row)) + " |")
    return "\n".join(lines) + "\n"


def csv_rows(rows: list[Row]) -> str:
    output = io.StringIO()
    writer = csv.writer(output, lineterminator="\n")
    writer.writerow(
        [
            "group",
            "model",
            "layers",
            "heldout_word_ppl",
            "lastword_acc",
            "lastword_acc_stderr",
            "lastword_ppl",
            "cloze_acc",
            "cloze_acc_stderr",
            "mqar_acc",
            "mqar_acc_stderr",
            "mqar_chance",
            "parameters",
            "train_seconds_corpus",
            "train_seconds_mqar",
            "notes",
        ]
    )
    for row in rows:
        values = [
            row.heldout_ppl.value,
            row.lastword.value,
            row.lastword.stderr,
            row.lastword_ppl.value,
            row.cloze.value,
            row.cloze.stderr,
            row.recall.value,
            row.recall.stderr,
            row.recall_chance,
            row.parameters,
            row.train_seconds,
            row.recall_train_seconds,
        ]
        writer.writerow(
            [row.group, row.label, row.layers, *("" if v is None else v for v in values), "; ".join(row.notes)]
        )
    return output.getvalue()


# --- the claims ------------------------------------------------------------------------------------


@dataclass
class Claim:
    statement: str
    source: str  # where the paper (or the issue) makes it
    verdict: str
    evidence: str


def _find(rows: list[Row], group: str, mixer: str | None = None) -> Row | None:
    """The first row of a group (and mixer), replicates aside."""
    return next((r for r in rows if r.group == group and (mixer is None or r.mixer == mixer) and r.seed is None), None)


def _at_chance(measure: Measure, chance: float) -> bool:
    return measure.value - chance <= max(NEAR_CHANCE_POINTS, 2 * (measure.stderr or 0.0))


def columns_at_chance(rows: list[Row]) -> list[str]:
    """The accuracy columns on which no trained model (skip rows aside) is above chance: at this budget they
    cannot separate the mixers."""
    trained = [row for row in rows if row.group != "skip"]
    columns = {
        "lastword": [(row.lastword, LASTWORD_CHANCE) for row in trained],
        "cloze": [(row.cloze, CLOZE_CHANCE) for row in trained],
        "MQAR": [(row.recall, row.recall_chance) for row in trained if row.recall_chance is not None],
    }
    return [
        name
        for name, pairs in columns.items()
        if (known := [(m, chance) for m, chance in pairs if m.value is not None])
        and all(_at_chance(m, chance) for m, chance in known)
    ]


def _untrained(row: Row) -> bool:
    """Whether a row's recall accuracy is known and not well above the no-recall floor (it learned no recall)."""
    known = row.recall.value is not None and row.recall_floor is not None
    return known and row.recall.value - row.recall_floor < WELL_ABOVE_POINTS


def _close(a: Measure, b: Measure, points: float) -> bool:
    combined = math.hypot(a.stderr or 0.0, b.stderr or 0.0)
    return abs(a.value - b.value) <= max(points, 2 * combined)


def _ppl_ratio(row: Row | None, reference: Row | None) -> float | None:
    if row is None or reference is None or row.heldout_ppl.value is None or not reference.heldout_ppl.value:
        return None
    return row.heldout_ppl.value / reference.heldout_ppl.value


def _standard_ppls(rows: list[Row]) -> list[float]:
    """Held-out perplexities of standard, one per seed the study trained it with."""
    return [row.heldout_ppl.value for row in rows if row.group == "standard" and row.heldout_ppl.value]


def close_ppl_limit(rows: list[Row]) -> float:
    """The largest ppl ratio to standard that counts as close: CLOSE_PPL_RATIO, or, when the study trained
    standard with several seeds, the spread of their held-out perplexities (max / min) if that is larger."""
    values = _standard_ppls(rows)
    return max(CLOSE_PPL_RATIO, max(values) / min(values)) if len(values) > 1 else CLOSE_PPL_RATIO


def _closeness_rule(rows: list[Row]) -> str:
    limit = close_ppl_limit(rows)
    spread = f" (the spread of standard's {len(_standard_ppls(rows))} seeds)" if limit > CLOSE_PPL_RATIO else ""
    return f"ppl ratio ≤ {limit:.2f}{spread} and MQAR within max({CLOSE_ACC_POINTS:.0f}, 2σ) points"


def _closeness(row: Row, standard: Row, ppl_limit: float) -> tuple[float | None, bool | None, bool | None]:
    """(ppl ratio row/standard, ppl within ×`ppl_limit`, MQAR within max(CLOSE_ACC_POINTS, 2 combined σ));
    each verdict None when its measure is missing."""
    ratio = _ppl_ratio(row, standard)
    recall_close = None
    if row.recall.value is not None and standard.recall.value is not None:
        recall_close = _close(row.recall, standard.recall, CLOSE_ACC_POINTS)
    return ratio, None if ratio is None else ratio <= ppl_limit, recall_close


def _both_close(ppl_close: bool | None, recall_close: bool | None) -> bool | None:
    """Close on every measure that is known; None when neither is."""
    if ppl_close is None and recall_close is None:
        return None
    return ppl_close is not False and recall_close is not False


def close_to_standard(row: Row, standard: Row, ppl_limit: float = CLOSE_PPL_RATIO) -> tuple[float | None, bool | None]:
    """(ppl ratio row/standard, whether the row is close to standard): held-out ppl within ×`ppl_limit`
    and MQAR within max(CLOSE_ACC_POINTS, 2 combined σ), judged on what is known; None when neither is."""
    ratio, ppl_close, recall_close = _closeness(row, standard, ppl_limit)
    return ratio, _both_close(ppl_close, recall_close)


def _versus(row: Row, ratio: float | None, reference: str = "", digits: int = 2) -> str:
    """ "mixer: ppl ×ratio[ of reference], MQAR acc": one model's part of a claim's evidence."""
    part = f"{row.mixer}: ppl ×{ratio:.{digits}f}{reference}" if ratio is not None else f"{row.mixer}: ppl –"
    return part + (f", MQAR {_cell(row.recall)}" if row.recall.value is not None else "")


def claim_mlp_collapses(rows: list[Row]) -> Claim:
    statement = "Token mixing is necessary: uniform mlp collapses (recall at chance) while standard does not"
    standard, mlp = _find(rows, "standard"), _find(rows, "uniform", "mlp")
    source = "paper §5 Table 1 (uniform mlp 40.0 NLU avg, 993.5 ppl vs 51.9, 38.1)"
    if standard is None or mlp is None:
        return Claim(statement, source, NOT_STUDIED, "no uniform mlp or no standard model")
    if standard.recall.value is None or mlp.recall.value is None:
        return Claim(statement, source, CANNOT_TELL, "uniform mlp or standard has no recall accuracy")
    chance = standard.recall_chance
    ratio = _ppl_ratio(mlp, standard)
    evidence = (
        f"MQAR accuracy: standard {_cell(standard.recall)}, uniform mlp {_cell(mlp.recall)} (chance {chance:.1f}); "
        f"lastword acc: standard {_cell(standard.lastword)}, mlp {_cell(mlp.lastword)}; lastword ppl: standard "
        f"{_cell(Measure(standard.lastword_ppl.value), 0)}, mlp {_cell(Measure(mlp.lastword_ppl.value), 0)}"
        + (f"; held-out ppl ratio mlp/standard {ratio:.2f}" if ratio else "")
    )
    if _untrained(standard):
        return Claim(
            statement,
            source,
            CANNOT_TELL,
            evidence + f" — standard is not {WELL_ABOVE_POINTS:.0f} points above the no-recall level, "
            "so this budget cannot separate them",
        )
    verdict = AGREES if _at_chance(mlp.recall, chance) else DISAGREES
    return Claim(statement, source, verdict, evidence)


def claim_hybrids_match(rows: list[Row]) -> Claim:
    statement = "Hybrids (standard attention in every other layer) match standard"
    source = "paper §5 Table 1 (every hybrid within ~2 NLU points / ~2 ppl of standard)"
    standard = _find(rows, "standard")
    hybrids = [row for row in rows if row.group == "hybrid"]
    if standard is None or not hybrids:
        return Claim(statement, source, NOT_STUDIED, "no standard or no hybrid rows")
    if _untrained(standard):
        return Claim(
            statement,
            source,
            CANNOT_TELL,
            f"standard's MQAR accuracy {_cell(standard.recall)} is not "
            f"{WELL_ABOVE_POINTS:.0f} points above the no-recall level: nothing learned to match",
        )
    parts, outliers, unknown = [], [], []
    limit = close_ppl_limit(rows)
    for row in hybrids:
        ratio, close = close_to_standard(row, standard, limit)
        if close is None:
            unknown.append(row.mixer)
            continue
        parts.append(_versus(row, ratio))
        if not close:
            outliers.append(row.mixer)
    evidence = (
        f"standard: ppl {_cell(standard.heldout_ppl)}, MQAR {_cell(standard.recall)}; "
        + "; ".join(parts)
        + f" (close = {_closeness_rule(rows)})"
    )
    if outliers:
        evidence += f"; not close: {', '.join(outliers)}"
        compared = [row for row in hybrids if row.mixer in outliers] + _replicates(rows)
        return Claim(statement, source, DISAGREES, evidence + _loss_gaps(standard, compared))
    if unknown or not parts:
        return Claim(statement, source, CANNOT_TELL, evidence + f"; missing: {', '.join(unknown)}")
    return Claim(statement, source, AGREES, evidence)


def _replicates(rows: list[Row]) -> list[Row]:
    return [row for row in rows if row.group == "standard" and row.seed is not None]


def _loss_gaps(standard: Row, rows: list[Row]) -> str:
    """ "; training-loss gap to standard …: mlp +0.08 → +0.12, …" for `rows`, where known: whether a gap
    was still closing at the end of training (more tokens might close it) or not. Standard's replicates,
    listed too, show how far apart two seeds of the same model are."""
    gaps = []
    for row in rows:
        if row.window_losses and standard.window_losses:
            steps = [f"{ours - theirs:+.2f}" for ours, theirs in zip(row.window_losses, standard.window_losses)]
            gaps.append(f"{row.label} {' → '.join(steps)}")
    if not gaps:
        return ""
    windows = " → ".join(f"{start:.0%}–{stop:.0%}" for start, stop in LOSS_WINDOWS)
    return f"; training-loss gap to standard, nats/token (mean over {windows} of the steps): {', '.join(gaps)}"


def claim_skip_collapses(rows: list[Row]) -> Claim:
    statement = "Skip collapses: a hybrid with its variant layers removed loses what it learned"
    source = "paper §5 Table 1 (every skip row falls to chance)"
    skips = [row for row in rows if row.group == "skip"]
    if not skips:
        return Claim(statement, source, NOT_STUDIED, "no skip rows")
    parts, survivors, unlearned = [], [], []
    for row in skips:
        hybrid = _find(rows, "hybrid", row.mixer)
        ratio = _ppl_ratio(row, hybrid)
        floor = row.recall_floor
        recall_collapsed = None  # recall can only be lost by a hybrid that learned it
        if row.recall.value is not None and floor is not None and hybrid is not None and not _untrained(hybrid):
            recall_collapsed = _at_chance(row.recall, floor)
        parts.append(_versus(row, ratio, " of its hybrid", digits=1))
        if (ratio is not None and ratio >= COLLAPSE_PPL_RATIO) or recall_collapsed is True:
            continue
        (unlearned if recall_collapsed is None else survivors).append(row.mixer)
    evidence = "; ".join(parts) + (
        f" (collapse = ppl ≥ {COLLAPSE_PPL_RATIO:.0f}× the hybrid's, or MQAR down to the no-recall floor: the "
        "better of chance and guessing among the values in the context)"
    )
    if survivors:
        return Claim(statement, source, DISAGREES, evidence + f"; survives: {', '.join(survivors)}")
    if unlearned:
        return Claim(
            statement,
            source,
            CANNOT_TELL,
            evidence + f"; the hybrid learned no recall to lose, and its ppl did not collapse: {', '.join(unlearned)}",
        )
    return Claim(statement, source, AGREES, evidence)


def claim_form_relaxable(rows: list[Row]) -> Claim:
    statement = (
        "The mathematical form can be relaxed (uniform approximate stays near standard) but not dropped "
        "(uniform nonapprox is far worse)"
    )
    source = "paper §5 Table 1 (approximate 47.9 ppl, nonapprox 9E+4, standard 38.1)"
    standard = _find(rows, "standard")
    approx, nonapprox = _find(rows, "uniform", "approximate"), _find(rows, "uniform", "nonapprox")
    if standard is None or approx is None or nonapprox is None:
        return Claim(statement, source, NOT_STUDIED, "no standard, uniform approximate or uniform nonapprox model")
    approx_ratio, nonapprox_ratio = _ppl_ratio(approx, standard), _ppl_ratio(nonapprox, standard)
    if approx_ratio is None or nonapprox_ratio is None:
        return Claim(statement, source, CANNOT_TELL, "uniform approximate or nonapprox has no perplexity")
    evidence = (
        f"held-out ppl relative to standard: approximate ×{approx_ratio:.2f}, nonapprox ×{nonapprox_ratio:.2f}"
        + (
            f"; MQAR approximate {_cell(approx.recall)}, nonapprox {_cell(nonapprox.recall)}, "
            f"standard {_cell(standard.recall)}"
            if approx.recall.value is not None and nonapprox.recall.value is not None
            else ""
        )
    )
    if nonapprox_ratio <= approx_ratio:
        return Claim(statement, source, DISAGREES, evidence + "; nonapprox is not worse than approximate")
    if nonapprox_ratio < COLLAPSE_PPL_RATIO * approx_ratio:
        return Claim(
            statement,
            source,
            CANNOT_TELL,
            evidence + f"; nonapprox's ppl is less than {COLLAPSE_PPL_RATIO:.0f}× approximate's: at this budget "
            "dropping the form is not clearly worse than relaxing it",
        )
    return Claim(statement, source, AGREES, evidence)


def claim_sequence_dependency(rows: list[Row]) -> Claim:
    statement = (
        "Sequence-dependent mixing generalises better: input-independent maps (rndembqk, fixedseqqk) fall "
        "behind standard, and cannot do content-based recall"
    )
    source = "paper §5 (rndembqk 84.8, fixedseqqk 79.1 ppl vs 38.1) and §9 (recall isolates the principle)"
    standard = _find(rows, "standard")
    variants = [row for row in (_find(rows, "uniform", "rndembqk"), _find(rows, "uniform", "fixedseqqk")) if row]
    if standard is None or not variants:
        return Claim(statement, source, NOT_STUDIED, "no standard or no uniform rndembqk/fixedseqqk model")
    if standard.recall.value is None:
        return Claim(statement, source, CANNOT_TELL, "standard has no recall accuracy")
    parts, better, unknown = [], [], []
    for row in variants:
        ratio = _ppl_ratio(row, standard)
        parts.append(_versus(row, ratio))
        if ratio is None or row.recall.value is None:
            unknown.append(row.mixer)
            continue
        worse_recall = row.recall.value < standard.recall.value and not _close(
            row.recall, standard.recall, CLOSE_ACC_POINTS
        )
        if ratio <= 1.0 or not worse_recall:
            better.append(row.mixer)
    evidence = f"standard MQAR {_cell(standard.recall)}; " + "; ".join(parts)
    if better:
        return Claim(statement, source, DISAGREES, evidence + f"; not behind standard: {', '.join(better)}")
    if _untrained(standard):
        return Claim(
            statement,
            source,
            CANNOT_TELL,
            evidence + f" — standard is not {WELL_ABOVE_POINTS:.0f} points above the no-recall level, so nothing "
            "shows that content-based recall is needed",
        )
    if unknown:
        return Claim(statement, source, CANNOT_TELL, evidence + f"; no ppl or MQAR for: {', '.join(unknown)}")
    return Claim(statement, source, AGREES, evidence)


CLAIMS = (
    claim_mlp_collapses,
    claim_form_relaxable,
    claim_sequence_dependency,
    claim_hybrids_match,
    claim_skip_collapses,
)


def activation_claim(analyses: dict[str, dict], rows: list[Row] | None = None) -> Claim:
    """Pre-softmax outliers: uniform nonapprox > 10³, hybrid layers < ~10 (paper §6, Fig. 2). `analyses`: the
    study's `indicators.json` by analysis name; `rows`, when given, tell whether the study trains both models."""
    statement = "Uniform nonapprox develops pre-softmax outliers (> 10³); standard layers in a hybrid keep them small"
    source = "paper §6, Fig. 2 (outliers > 10³ in late uniform nonapprox layers; hybrids below ~10)"
    if rows is not None and (_find(rows, "uniform", "nonapprox") is None or _find(rows, "hybrid", "nonapprox") is None):
        return Claim(statement, source, NOT_STUDIED, "no uniform or no hybrid nonapprox model")

    def largest(analysis: str, model_suffix: str) -> float | None:
        layers = analyses.get(analysis, {}).get("layers", [])
        values = [
            layer["logits"]["max_abs"]
            for layer in layers
            if layer["model"].endswith(model_suffix) and layer.get("mixer") == "nonapprox" and layer.get("logits")
        ]
        return max(values) if values else None

    uniform, hybrid = largest("uniform", "uniform-nonapprox"), largest("hybrid", "hybrid-nonapprox")
    if uniform is None or hybrid is None:
        return Claim(statement, source, CANNOT_TELL, "no nonapprox layers analysed")
    evidence = f"largest |pre-softmax activation| of nonapprox layers: uniform {uniform:.3g}, hybrid {hybrid:.3g}"
    if uniform <= 1e3:
        return Claim(
            statement,
            source,
            CANNOT_TELL,
            evidence + " — the uniform model never reached the paper's regime (≤ 10³) at this size and budget",
        )
    return Claim(statement, source, AGREES if hybrid < 10 else DISAGREES, evidence)


# --- where and how many standard layers (placement studies) ---------------------------------------


@dataclass
class PlacementPoint:
    """One trained layer list of a placement study, judged against the all-standard model."""

    row: Row
    layers: tuple[str, ...]  # one mixer per layer, first layer first
    spread: bool  # the share sweep's evenly spread standard layers (uniform and standard included)
    ppl_ratio: float | None
    ppl_close: bool | None  # within the closeness limit on each measure; None when unmeasured
    recall_close: bool | None

    @property
    def rescued(self) -> bool | None:
        """Close to standard on every known measure (`close_to_standard`); None when nothing is known."""
        return _both_close(self.ppl_close, self.recall_close)

    @property
    def standard_layers(self) -> int:
        return self.layers.count("standard")

    def layer_map(self) -> str:
        return "".join("S" if name == "standard" else "x" for name in self.layers)


def placement_points(rows: list[Row], mixer: str, depth: int) -> list[PlacementPoint]:
    """Every trained row of a placement study (`attnlab.study`'s placements preset), in order of the number of
    standard layers; the all-standard row is the reference the others are judged against."""
    standard = _find(rows, "standard")
    if standard is None:
        return []
    spread = {tuple(share_pattern(mixer, count, depth).split(",")) for count in range(1, depth + 1)}
    spread.add((mixer,) * depth)
    points, limit = [], close_ppl_limit(rows)
    for row in rows:
        if row.group == "skip" or not row.layers or row.seed is not None:
            continue
        layers = tuple(resolve_layer_pattern(row.layers, depth))
        points.append(PlacementPoint(row, layers, layers in spread, *_closeness(row, standard, limit)))
    return sorted(points, key=lambda point: point.standard_layers)


def _smallest_share(sweep: list[PlacementPoint], verdict: str) -> int | None:
    """The fewest standard layers from which `verdict` (a PlacementPoint attribute) holds for every larger share of
    the sweep; None when a share needed to decide it has no such verdict."""
    smallest = None
    for point in sorted(sweep, key=lambda point: -point.standard_layers):
        holds = getattr(point, verdict)
        if holds is None:
            return None
        if not holds:
            break
        smallest = point.standard_layers
    return smallest


def minimum_rescue(points: list[PlacementPoint], mixer: str, depth: int) -> str:
    """A sentence naming the smallest evenly spread share of standard layers from which every larger share is
    rescued (docs/method.md §9's open question), and the placements that rescue the mixer with fewer."""
    sweep = [point for point in points if point.spread]
    counts = [point.standard_layers for point in sweep]
    missing = [count for count in range(depth + 1) if count not in counts]
    if missing or any(point.rescued is None for point in sweep):
        unknown = missing + [point.standard_layers for point in sweep if point.rescued is None]
        return f"Cannot tell the minimum share: no numbers for {', '.join(map(str, sorted(unknown)))} standard layers."
    smallest = _smallest_share(sweep, "rescued")
    best = next(point for point in sweep if point.standard_layers == smallest)
    if smallest == depth:
        sentence = f"No share of standard layers below {depth} of {depth} rescues {mixer}"
    else:
        sentence = (
            f"The smallest evenly spread share of standard layers that rescues {mixer} is {smallest} of {depth} "
            f"({best.row.label}, {best.layer_map()}: ppl ×{best.ppl_ratio or math.nan:.2f} of standard's, MQAR "
            f"{_cell(best.row.recall)}), and every larger share is rescued too"
        )
    by_measure = [
        f"{name} alone {count} of {depth}"
        for name, field_name in (("by MQAR", "recall_close"), ("by held-out perplexity", "ppl_close"))
        if (count := _smallest_share(sweep, field_name)) is not None
    ]
    if by_measure:
        sentence += " (" + "; ".join(by_measure) + ")"
    fewer = [p for p in points if not p.spread and p.rescued and p.standard_layers < smallest]
    if fewer:
        sentence += "; placed differently, fewer also rescue it: " + ", ".join(
            f"{p.row.label} ({p.standard_layers} of {depth}, {p.layer_map()})" for p in fewer
        )
    return sentence + "."


def placement_section(rows: list[Row], mixer: str, depth: int, out: Path) -> list[str]:
    """The report's lines on placements and the share sweep, and its figure `figures/share_sweep.png`."""
    from .plots import share_sweep

    points = placement_points(rows, mixer, depth)
    if not points:
        return []
    lines = [
        "## Where and how many standard layers",
        "",
        (
            f"Every trained layer list, by its number of standard layers: S = standard, x = {mixer}, first layer on "
            f"the left. Rescued = close to standard: {_closeness_rule(rows)}. Spread = the share sweep's evenly "
            "spread layers."
        ),
        "",
        "| standard layers | layers | model | spread | ppl × standard | MQAR acc | rescued |",
        "|---:|---|---|---|---:|---:|---|",
    ]
    for point in points:
        ratio = "–" if point.ppl_ratio is None else f"{point.ppl_ratio:.2f}"
        rescued = "–" if point.rescued is None else "yes" if point.rescued else "no"
        lines.append(
            f"| {point.standard_layers} | `{point.layer_map()}` | {point.row.label} | {'yes' if point.spread else ''} "
            f"| {ratio} | {_cell(point.row.recall)} | {rescued} |"
        )
    lines += ["", minimum_rescue(points, mixer, depth), ""]
    figure_points = [
        {
            "standard_layers": point.standard_layers,
            "label": point.row.label,
            "ppl_ratio": point.ppl_ratio,
            "recall": point.row.recall.value,
            "spread": point.spread,
        }
        for point in points
    ]
    share_sweep(figure_points, depth, mixer, out / "figures", close_ratio=close_ppl_limit(rows))
    return lines


# --- the report ------------------------------------------------------------------------------------


def _figure_links(out: Path) -> list[str]:
    lines = []
    for folder in sorted((out / "analysis").glob("*")):
        for png in sorted(folder.glob("*.png")):
            lines.append(f"![{folder.name}: {png.stem}]({png.relative_to(out).as_posix()})")
    for png in sorted((out / "figures").glob("*.png")):
        lines.append(f"![{png.stem}]({png.relative_to(out).as_posix()})")
    return lines


def _recall_loss_figure(out: Path, study) -> list[Path]:
    from .plots import loss_curves

    metrics = [
        run_folder(out, run.name) / "metrics.jsonl"
        for run in study.runs
        if run.data == "recall" and (run_folder(out, run.name) / "metrics.jsonl").is_file()
    ]
    if not metrics:
        return []
    labels = [path.parent.name for path in metrics]
    return loss_curves(metrics, out / "figures", name="recall_loss_curves", labels=labels)


def software_line(record: dict[str, str | None]) -> str:
    """The versions of the process that wrote the report (`attnlab.environment.versions`), in one line."""
    packages = ", ".join(f"{name} {version or 'not installed'}" for name, version in record.items() if name != "lock")
    return f"Written with {packages}; installed packages: {record.get('lock')}."


# --- who does what (attnlab circuits on the recall runs) ----------------------------------------------------


def _best_head(scores: list[dict | None], name: str) -> tuple[float, str] | None:
    """(score, "L<layer>.H<head>", layers from 1) of the head with the highest `name` score, or None."""
    candidates = [
        (values[name][head], f"L{layer + 1}.H{head}")
        for layer, values in enumerate(scores)
        if values
        for head in range(len(values[name]))
    ]
    return max(candidates) if candidates else None


def _largest_drop(ablation: dict) -> tuple[float, str] | None:
    """(accuracy after, "L<layer>.H<head>") of the head whose ablation costs the most accuracy, or None."""
    candidates = [
        (head["accuracy"], f"L{layer['layer'] + 1}.H{index}")
        for layer in ablation["layers"]
        if layer["heads"]
        for index, head in enumerate(layer["heads"])
    ]
    return min(candidates) if candidates else None


def _hosting_layers(scores: list[dict | None], name: str, threshold: float) -> list[int]:
    """Layers (from 0) with a head whose `name` score reaches `threshold`."""
    return [layer for layer, values in enumerate(scores) if values and max(values[name]) >= threshold]


def _needed_layers(entry: dict) -> str:
    """The layers whose ablation loses at least half of the accuracy above chance ("L2 standard (18.3)"), or
    "none"; "at chance" for a model with less than 10 points above chance to lose."""
    baseline, chance = entry["ablation"]["baseline"]["accuracy"], entry["chance_accuracy"] or 0.0
    if baseline - chance < 0.1:
        return "at chance"
    needed = [
        f"L{layer['layer'] + 1} {layer['mixer']} ({100 * layer['accuracy']:.1f})"
        for layer in entry["ablation"]["layers"]
        if layer["accuracy"] <= chance + (baseline - chance) / 2
    ]
    return ", ".join(needed) or "none"


def circuits_section(out: Path, study) -> list[str]:
    """ "Who does what": per recall model, its strongest previous-token and retrieval heads on the task's own
    examples (and previous-token and induction heads on repeated blocks), the layers it cannot recall without
    and the head whose ablation costs the most; two hypotheses checked on each model: "a model recalls iff some
    layer hosts the previous-token step" and "… iff a previous-token step is followed by a retrieval step in a
    later layer" (`attnlab.circuits`; empty when no recall run has circuits)."""
    lines, verdicts = [], {"previous-token": ([], []), "two-step": ([], [])}
    for run in study.runs:
        record = _read_json(run_folder(out, run.name) / STUDY_FILES / "circuits" / "circuits.json")
        if run.data != "recall" or record is None:
            continue
        entry = next(iter(record["models"].values()))
        task_scores = entry["task_scores"] or entry["scores"]  # an induction task: its sequences are repeated blocks
        retrieval_name = "retrieval" if entry["task_scores"] else "induction"
        accuracy = 100 * entry["ablation"]["baseline"]["accuracy"]
        previous_layers = _hosting_layers(task_scores, "previous_token", PREVIOUS_TOKEN_HEAD)
        retrieval_layers = _hosting_layers(task_scores, retrieval_name, RETRIEVAL_HEAD)
        predictions = {
            "previous-token": bool(previous_layers),
            "two-step": any(later > first for first in previous_layers for later in retrieval_layers),
        }
        recalls = accuracy >= RECALLS_PERCENT
        label = run.mixer if run.kind == "standard" else f"{run.kind} {run.mixer}"
        for name, predicted in predictions.items():
            verdicts[name][predicted != recalls].append(label)
        lines.append(
            f"| {label} | {''.join('S' if name == 'standard' else 'x' for name in entry['mixer_types'])} "
            f"| {accuracy:.1f} | {_head_cell(_best_head(task_scores, 'previous_token'))} "
            f"| {_head_cell(_best_head(task_scores, retrieval_name))} "
            f"| {_head_cell(_best_head(entry['scores'], 'previous_token'))} "
            f"| {_head_cell(_best_head(entry['scores'], 'induction'))} | {_needed_layers(entry)} "
            f"| {_head_cell(_largest_drop(entry['ablation']), percent=True)} "
            f"| {' / '.join('yes' if predicted == recalls else 'no' for predicted in predictions.values())} |"
        )
    if not lines:
        return []
    hypotheses = {
        "previous-token": "a model recalls iff some layer hosts the previous-token step",
        "two-step": "a model recalls iff a layer hosting the previous-token step is followed by a later layer "
        "hosting the retrieval step",
    }
    claims = []
    for name, (fits, misfits) in verdicts.items():
        verdict = "holds for every model" if not misfits else f"fails for {len(misfits)} of {len(fits) + len(misfits)}"
        claims.append(
            f"- **{verdict}** — hypothesis: {hypotheses[name]}. Fit: {', '.join(fits) or 'none'}. "
            f"Do not fit: {', '.join(misfits) or 'none'}."
        )
    return [
        "## Who does what",
        "",
        f"From `attnlab circuits` on each recall run (`runs/NAME/study/circuits/`). Task scores on the held-out "
        f"MQAR examples: previous-token = a value reading its own key, retrieval = a query reading the value of "
        f"its key; repeated-block scores on random blocks seen twice. A layer hosts the previous-token step when "
        f"one of its heads has a task previous-token score ≥ {PREVIOUS_TOKEN_HEAD}, the retrieval step when one "
        f"has a retrieval score ≥ {RETRIEVAL_HEAD}; a model recalls when its MQAR accuracy is ≥ "
        f"{RECALLS_PERCENT:.0f} %. Ablations replace a head's (or layer's) output by its mean over the held-out "
        f"examples; a layer is needed when that loses at least half of the accuracy above chance. Layers: S "
        f"standard, x the variant.",
        "",
        "| model | layers | MQAR % | previous-token head (task) | retrieval head (task) | previous-token head "
        "(repeated blocks) | induction head (repeated blocks) | layers needed (MQAR % without) | costliest head "
        "ablated (MQAR % after) | fits (previous-token / two-step) |",
        "| --- | --- | ---: | --- | --- | --- | --- | --- | --- | --- |",
        *lines,
        "",
        *claims,
        "",
    ]


def _head_cell(best: tuple[float, str] | None, percent: bool = False) -> str:
    if best is None:
        return "n/a"
    value, head = best
    return f"{head} ({100 * value:.1f})" if percent else f"{head} ({value:.2f})"


def write_report(out: str | Path, study) -> Path:
    """Write `out/report.md`, `out/report.csv` and the recall loss curves; return the report's path."""
    out = Path(out)
    rows = collect_rows(out, study)
    analyses = {
        folder.name: data
        for folder in sorted((out / "analysis").glob("*"))
        if (data := _read_json(folder / "indicators.json")) is not None
    }
    _recall_loss_figure(out, study)
    claims = [claim(rows) for claim in CLAIMS] + [activation_claim(analyses, rows)]
    failed = [f"{row.group} {row.label}: {', '.join(row.notes)}" for row in rows if row.notes]
    lines = [
        f"# attnlab study: {study.name}",
        "",
        study.notes,
        "",
        "## Main table",
        "",
        (
            "Accuracies in percent ± standard error; held-out word perplexity from `attnlab eval --tasks heldout`; "
            "MQAR accuracy at query positions of held-out examples; skip rows are the hybrids evaluated with their "
            "variant layers removed. Also in `report.csv`."
        ),
        "",
        markdown_table(rows),
    ]
    if at_chance := columns_at_chance(rows):
        lines += [
            f"No model is above chance on {', '.join(at_chance)} (within max({NEAR_CHANCE_POINTS:.0f} points, 2σ)):"
            + " at this budget these columns cannot separate the mixers.",
            "",
        ]
    if failed:
        lines += ["Incomplete rows: " + "; ".join(failed), ""]
    if study.name.startswith("placements:"):
        depth = next(run.model["num_hidden_layers"] for run in study.runs if "num_hidden_layers" in run.model)
        lines += placement_section(rows, study.name.split(":", 1)[1], depth, out)
    lines += circuits_section(out, study)
    lines += ["## The paper's claims, checked on this run", ""]
    for claim in claims:
        if claim.verdict != NOT_STUDIED:
            lines += [f"- **{claim.verdict}** — {claim.statement} ({claim.source}). {claim.evidence}."]
    if not_studied := [claim.statement for claim in claims if claim.verdict == NOT_STUDIED]:
        lines += [
            "",
            "Not checked here (this study trains none of the models they compare): " + "; ".join(not_studied) + ".",
        ]
    lines += ["", "## Figures", ""]
    lines += [link + "\n" for link in _figure_links(out)]
    lines += ["## Software", "", software_line(versions())]
    write_text_atomic(out / "report.csv", csv_rows(rows))
    path = out / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
