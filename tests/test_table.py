"""The Table 1 layout: row groups and order, columns in the paper's order, the NLU average, reference rows,
cell formatting, CSV, and the majority-class figures checked against the datasets when they are here."""

from __future__ import annotations

import csv
import io
import json

import pytest

from attnlab.evaluation import PAPER_NLU_TASKS
from attnlab.table import MAJORITY_CLASS, csv_table, markdown_table, ppl_context_table

from .conftest import SHARED_DIR


def make_record(mixer_types, accuracies, skip=False, checkpoint="runs/x", wikitext=None, contexts=None) -> dict:
    others = sorted(set(mixer_types) - {"standard"})
    kind = "standard" if not others else ("uniform" if "standard" not in mixer_types else "hybrid")
    results = {task: {"acc,none": value, "acc_stderr,none": 0.01} for task, value in accuracies.items()}
    if wikitext is not None:
        results["wikitext"] = {"word_perplexity,none": wikitext, "word_perplexity_stderr,none": "N/A"}
    record = {
        "results": results,
        "attnlab": {
            "checkpoint": checkpoint,
            "mixer_types": list(mixer_types),
            "kind": kind,
            "mixer": others[0] if others else "standard",
            "skip_nonstandard": skip,
            "parameters": 1000,
        },
    }
    if contexts:
        record["ppl_contexts"] = {"data": "t.txt", "by_context": {str(c): {"word_perplexity": v} for c, v in contexts}}
    return record


NLU = dict.fromkeys(PAPER_NLU_TASKS, 0.5)


def test_rows_follow_table_1_groups_and_mixer_order():
    records = [
        make_record(["standard", "nonapprox"], NLU, skip=True),
        make_record(["mlp", "mlp"], NLU),
        make_record(["standard", "nonapprox"], NLU),
        make_record(["approximate", "approximate"], NLU),
        make_record(["standard", "standard"], NLU),
    ]
    lines = markdown_table(records).splitlines()
    rows = [tuple(cell.strip() for cell in line.split("|")[1:3]) for line in lines[2:]]
    assert rows == [
        ("reference", "random guess"),
        ("reference", "majority class"),
        ("standard", "standard"),
        ("uniform", "mlp"),
        ("uniform", "approximate"),
        ("hybrid", "nonapprox"),
        ("skip", "nonapprox"),
    ]


def test_columns_nlu_average_and_cells():
    accuracies = {**NLU, "boolq": 0.62, "copa": 0.8}
    record = make_record(["standard"], accuracies, wikitext=93876.5)
    header, _, random_row, majority_row, standard_row = markdown_table([record]).splitlines()
    headers = [cell.strip() for cell in header.split("|")[3:-1]]
    assert headers == ["ARC-e", "BoolQ", "COPA", "PIQA", "SciQ", "RTE", "HellaSwag", "NLU avg", "WikiText ppl"]
    cells = [cell.strip() for cell in standard_row.split("|")[3:-1]]
    assert cells[:3] == ["50.0 ± 1.0", "62.0 ± 1.0", "80.0 ± 1.0"]
    assert cells[7] == f"{100 * sum(accuracies.values()) / 7:.1f}"
    assert cells[8] == "9E+4"  # as the paper writes exploded perplexities
    random_cells = [cell.strip() for cell in random_row.split("|")[3:-1]]
    assert random_cells == ["25.0", "50.0", "50.0", "50.0", "25.0", "50.0", "25.0", f"{275 / 7:.1f}", "–"]
    majority_cells = [cell.strip() for cell in majority_row.split("|")[3:-1]]
    assert majority_cells[1:4] == ["62.2", "55.0", "50.5"] and majority_cells[0] == "–" and majority_cells[7] == "–"


def test_the_same_variant_twice_is_told_apart_by_checkpoint():
    records = [
        make_record(["mlp"], {"cloze": 0.3}, checkpoint="runs/a"),
        make_record(["mlp"], {"cloze": 0.4}, checkpoint="runs/b"),
    ]
    text = markdown_table(records)
    assert "| uniform | mlp (a) |" in text and "| uniform | mlp (b) |" in text
    assert "majority class" not in text  # no reference figure for these tasks: the row is left out


def test_csv_has_every_value_with_its_stderr():
    record = make_record(["standard", "mlp"], {"cloze": 0.25, "lastword": 0.125})
    rows = list(csv.DictReader(io.StringIO(csv_table([record]))))
    assert [row["group"] for row in rows] == ["reference", "reference", "hybrid"]
    hybrid = rows[-1]
    assert float(hybrid["lastword acc"]) == 12.5 and float(hybrid["lastword acc stderr"]) == 1.0
    assert float(hybrid["cloze acc"]) == 25.0 and hybrid["mixer_types"] == "standard,mlp"
    assert rows[1]["cloze acc"] == ""  # no majority class for cloze


def test_perplexity_by_context_table():
    records = [make_record(["standard"], {}, contexts=[(128, 40.0), (256, 35.5)]), make_record(["mlp"], {})]
    lines = ppl_context_table(records).splitlines()
    assert lines[0] == "| group | model | ctx 128 | ctx 256 |"
    assert lines[2] == "| standard | standard | 40.0 | 35.5 |" and len(lines) == 3
    assert ppl_context_table([make_record(["mlp"], {})]) == ""


EVAL_DATA = SHARED_DIR / "data" / "eval"


@pytest.mark.skipif(not EVAL_DATA.is_dir(), reason="needs ../shared/data/eval (the paper's evaluation sets)")
def test_majority_class_figures_match_the_datasets():
    def share(labels) -> float:
        labels = list(labels)
        return 100 * max(labels.count(value) for value in set(labels)) / len(labels)

    def jsonl_golds(path):
        return [json.loads(line)["gold"] for line in path.read_text().splitlines() if line.strip()]

    assert MAJORITY_CLASS["boolq"] == pytest.approx(share(jsonl_golds(EVAL_DATA / "boolq" / "boolq.jsonl")))
    assert MAJORITY_CLASS["copa"] == pytest.approx(share(jsonl_golds(EVAL_DATA / "copa" / "copa.jsonl")))
    assert MAJORITY_CLASS["piqa"] == pytest.approx(share((EVAL_DATA / "piqa" / "valid-labels.lst").read_text().split()))
    rte_rows = list(csv.DictReader((EVAL_DATA / "rte" / "dev.tsv").open(), delimiter="\t"))
    assert MAJORITY_CLASS["rte"] == pytest.approx(share(row["label"] for row in rte_rows))


def test_the_nlu_average_covers_the_nlu_columns_shown():
    accuracies = {task: 0.5 for task in PAPER_NLU_TASKS if task != "piqa"}
    header, _, random_row, _, standard_row = markdown_table([make_record(["standard"], accuracies)]).splitlines()
    headers = [cell.strip() for cell in header.split("|")[3:-1]]
    assert "PIQA" not in headers
    nlu = headers.index("NLU avg")
    assert random_row.split("|")[3:-1][nlu].strip() == f"{(25 + 50 + 50 + 25 + 50 + 25) / 6:.1f}"  # no PIQA's 50
    assert standard_row.split("|")[3:-1][nlu].strip() == "50.0"


def test_table_cli_writes_md_and_csv_and_refuses_a_missing_folder(tmp_path, capsys):
    from attnlab.cli import main

    results = tmp_path / "results.json"
    results.write_text(json.dumps(make_record(["standard"] * 2, NLU)))
    assert main(["table", str(results), "--out", str(tmp_path / "t1")]) == 0
    assert (tmp_path / "t1.md").read_text().startswith("|") and (tmp_path / "t1.csv").is_file()
    capsys.readouterr()
    assert main(["table", str(results), "--out", str(tmp_path / "nowhere" / "t1")]) == 2
    output = capsys.readouterr()
    assert output.out == ""  # refused before the table is printed
    assert (
        output.err.strip()
        == f"attnlab: error: --out {tmp_path / 'nowhere' / 't1'}: folder {tmp_path / 'nowhere'} does not exist"
    )
