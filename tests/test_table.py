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
        == f"attnlab: error: --out {tmp_path / 'nowhere' / 't1'}.md: folder {tmp_path / 'nowhere'} does not exist"
    )


# ------------------------------------------------------------------------------ records the table cannot show


def recall_record() -> dict:
    """What `attnlab recall --out` writes (evaluation.evaluate_recall): no harness results."""
    meta = make_record(["standard"], {})["attnlab"]
    return {"task": "mqar:pairs=4", "seq_len": 64, "accuracy": 0.9, "stderr": 0.01, "chance": 0.25, "attnlab": meta}


@pytest.mark.parametrize(
    "content, message",
    [
        ({"attnlab": {}}, r"is not a results file written by `attnlab eval` \(its 'attnlab' block lacks 'checkpoint'"),
        (recall_record(), r"is a recall result written by `attnlab recall` \(task 'mqar:pairs=4'"),
        ({"evaluations": [make_record(["mlp"], NLU), {"attnlab": {"checkpoint": "x"}}]}, r"\(record 2 of 2\) is not"),
        ({**make_record(["mlp"], NLU), "results": {"boolq": 0.5}}, "'results' is not a mapping of task to metrics"),
    ],
)
def test_table_cli_refuses_what_attnlab_eval_did_not_write_in_one_line(tmp_path, capsys, content, message):
    from attnlab.cli import main
    from attnlab.table import load_table_records

    path = tmp_path / "e5.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message) as error:
        load_table_records([str(path)])
    assert str(error.value).startswith(str(path)) and "\n" not in str(error.value)
    assert main(["table", str(path), "--out", str(tmp_path / "t1")]) == 2  # whichever way the CLI reads the file
    output = capsys.readouterr()
    assert output.out == "" and output.err.startswith("attnlab: error: ") and output.err.count("\n") == 1
    assert not list(tmp_path.glob("t1*"))


def test_records_without_task_columns_give_no_empty_main_table():
    perplexity_only = make_record(["standard"], {}, contexts=[(32, 50.0), (64, 45.0)])
    del perplexity_only["results"]  # `attnlab eval --tasks none --ppl-contexts ...` writes no harness results
    assert markdown_table([perplexity_only]) == ""
    assert ppl_context_table([perplexity_only]).splitlines()[2] == "| standard | standard | 50.0 | 45.0 |"
    with pytest.raises(ValueError, match="no task metric the table can show"):
        markdown_table([make_record(["standard"], {})])  # nothing at all to show is an error, not an empty table


def test_table_cli_on_perplexity_only_results_prints_only_the_context_table(tmp_path, capsys):
    from attnlab.cli import main

    record = make_record(["standard"], {}, contexts=[(32, 50.0)])
    del record["results"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(record))
    assert main(["table", str(path)]) == 0
    tables = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert tables == ["| group | model | ctx 32 |", "|---|---|---:|", "| standard | standard | 50.0 |"]


def markdown_cells(line: str) -> list[str]:
    assert line.startswith("|") and line.endswith("|"), line
    return [cell.strip() for cell in line[1:-1].split("|")]


@pytest.mark.parametrize(
    "records",
    [
        [make_record(["standard"], NLU, wikitext=30.0), make_record(["standard", "mlp"], {"cloze": 0.3}, skip=True)],
        [make_record(["mlp"], {"cloze": 0.3}, contexts=[(32, 9.0)]), make_record(["mlp"], {}, contexts=[(64, 8.0)])],
        [make_record(["standard"], {"lastword": 0.1})],
        [make_record(["standard"], {}, contexts=[(16, 3.0)])],
    ],
)
def test_every_markdown_table_has_as_many_cells_in_each_line_as_headers(records):
    tables = [markdown_table(records), ppl_context_table(records)]
    assert any(tables)
    for table in filter(None, tables):
        header, separator, *rows = table.splitlines()
        assert markdown_cells(header)[:2] == ["group", "model"] and all(markdown_cells(header))
        assert markdown_cells(separator) == ["---", "---"] + ["---:"] * (len(markdown_cells(header)) - 2)
        assert rows and all(len(markdown_cells(row)) == len(markdown_cells(header)) for row in rows)


def test_rows_of_the_same_variant_get_distinct_labels():
    same_step = [
        make_record(["mlp"], {"cloze": 0.3}, checkpoint="runs/a/checkpoint-750"),
        make_record(["mlp"], {"cloze": 0.4}, checkpoint="runs/b/checkpoint-750"),
    ]
    text = markdown_table(same_step)
    assert "| uniform | mlp (a/checkpoint-750) |" in text and "| uniform | mlp (b/checkpoint-750) |" in text
    same_folder = [make_record(["standard"], {"cloze": c}, checkpoint="std") for c in (0.3, 0.4, 0.5)]
    labels = [
        row["model"] for row in csv.DictReader(io.StringIO(csv_table(same_folder))) if row["group"] != "reference"
    ]
    assert labels == ["standard (std#1)", "standard (std#2)", "standard (std#3)"]
    contexts = ppl_context_table([make_record(["standard"], {}, checkpoint="std", contexts=[(8, 2.0)])] * 2)
    assert [markdown_cells(line)[1] for line in contexts.splitlines()[2:]] == ["standard (std#1)", "standard (std#2)"]
    # a skip row and a plain row of the same checkpoint are in different groups: nothing to tell apart
    hybrid = make_record(["standard", "mlp"], {"cloze": 0.3}, checkpoint="runs/h")
    skip = make_record(["standard", "mlp"], {"cloze": 0.3}, checkpoint="runs/h", skip=True)
    assert "| hybrid | mlp |" in markdown_table([hybrid, skip]) and "| skip | mlp |" in markdown_table([hybrid, skip])
