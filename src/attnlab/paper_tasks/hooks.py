"""`custom_dataset` hooks that the task YAMLs in this folder name with `!function hooks.<task>`.

The harness calls a hook as `hook(**task_metadata, **dataset_kwargs)`. The hooks read `eval_data`, the
folder given as `TaskManager(metadata={"eval_data": DIR})` (`attnlab eval --eval-data DIR`), and ignore
the other keys (`version`, ...). Each returns a DatasetDict holding the one split that the harness scores
for the task, with the field names and values of the Hub dataset the harness would otherwise download,
so that the harness's own prompt templates render unchanged. Where a local copy lost a field, its hook
rebuilds it and says how; the two prompts that cannot be rebuilt byte for byte are:

* BoolQ: SuperGLUE passages start with the Wikipedia title ("Ethanol fuel -- All biomass ..."); the
  local copy (google's BoolQ release via llm-foundry) has no titles, so its prompts lack that prefix.
* HellaSwag: the local copy went through llama.cpp's preprocessing, which strips the space that the
  harness leaves at the start of an ending that began with a WikiHow tag ("[substeps] Include ..." is
  " Include ..." in the harness, "Include ..." here). The contexts are rebuilt exactly (see `hellaswag`).

Few-shot prompts differ for another reason: only the scored split is local, so the harness draws shots
from it instead of the training split. The paper evaluates zero-shot, where this does not arise.
Errors are ValueError with one line naming the task and the file.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pyarrow.parquet

from attnlab.paper_tasks import LOCAL_FILES

__all__ = ["arc_easy", "boolq", "copa", "hellaswag", "lambada_openai", "piqa", "rte", "sciq", "wikitext"]

_STRING = datasets.Value("string")


# --- reading the local files ---------------------------------------------------------------------------


def _local_path(task: str, eval_data: str | Path | None, index: int = 0) -> Path:
    relative_path = LOCAL_FILES[task][index]
    if eval_data is None:
        raise ValueError(
            f"task {task} needs --eval-data DIR, a folder holding {relative_path} (and the other tasks' files)"
        )
    path = Path(eval_data) / relative_path
    if not path.is_file():
        raise ValueError(f"task {task}: missing {relative_path} in eval data folder {eval_data} (expected {path})")
    return path


def _malformed(task: str, path: Path, where: str, problem: str) -> ValueError:
    """A one-line error for a local file that is not in the expected format (`where`: "line 3", or "")."""
    return ValueError(" ".join(part for part in (f"task {task}: {path}", where, problem) if part))


def _read_jsonl(task: str, path: Path, fields: tuple[str, ...]) -> list[dict]:
    """The JSON objects of a .jsonl file, each checked to have `fields`."""
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise _malformed(task, path, f"line {line_number}", f"is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or any(field not in record for field in fields):
                raise _malformed(task, path, f"line {line_number}", f"lacks one of the fields {', '.join(fields)}")
            records.append(record)
    if not records:
        raise _malformed(task, path, "", "holds no examples")
    return records


def _split(name: str, records: list[dict], features: datasets.Features) -> datasets.DatasetDict:
    return datasets.DatasetDict({name: datasets.Dataset.from_list(records, features=features)})


def _strip_prefix(task: str, path: Path, line_number: int, text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise _malformed(task, path, f"line {line_number}", f"does not start with {prefix!r}")
    return text[len(prefix) :]


# --- the nine tasks ----------------------------------------------------------------------------------------


def arc_easy(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """ARC-Easy `test` (allenai/ai2_arc, ARC-Easy) from llm-foundry's `{"query", "choices", "gold"}` lines.

    Rebuilt: `question` is `query` without its "Question: " prefix; `choices.text` are the choices; the
    letters A, B, ... stand in for the lost `choices.label`, and `answerKey` is the letter of `gold`, so
    `choices.label.index(answerKey)` is `gold`. `id` (lost) is "arc_easy.jsonl:<line>". The prompt uses
    only the question and the choice texts, so it is the harness's exactly.
    """
    path = _local_path("arc_easy", eval_data)
    records = []
    for line_number, record in enumerate(_read_jsonl("arc_easy", path, ("query", "choices", "gold")), start=1):
        labels = [chr(ord("A") + position) for position in range(len(record["choices"]))]
        if not 0 <= record["gold"] < len(labels):
            raise _malformed("arc_easy", path, f"line {line_number}", f"has gold {record['gold']} out of range")
        records.append(
            {
                "id": f"{path.name}:{line_number}",
                "question": _strip_prefix("arc_easy", path, line_number, record["query"], "Question: "),
                "choices": {"text": list(record["choices"]), "label": labels},
                "answerKey": labels[record["gold"]],
            }
        )
    features = datasets.Features(
        {
            "id": _STRING,
            "question": _STRING,
            "choices": {"text": datasets.List(_STRING), "label": datasets.List(_STRING)},
            "answerKey": _STRING,
        }
    )
    return _split("test", records, features)


def boolq(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """BoolQ `validation` (aps/super_glue, boolq) from llm-foundry's `{"query", "choices", "gold"}` lines.

    Rebuilt: `query` is "Passage: <passage>\\nQuestion: <question>?"; `passage` is the text between the
    prefix and the last "\\nQuestion: ", `question` the rest without its "?" (the harness adds it back),
    `label` is `gold` (0 = no, 1 = yes), `idx` the 0-based line number. Not rebuildable: SuperGLUE's
    passages start with "<Wikipedia title> -- ", which this copy never had, so each prompt lacks that
    prefix (the rest of the prompt, the choices " no"/" yes" and the gold are the harness's).
    """
    path = _local_path("boolq", eval_data)
    records = []
    for index, record in enumerate(_read_jsonl("boolq", path, ("query", "gold"))):
        text = _strip_prefix("boolq", path, index + 1, record["query"], "Passage: ")
        passage, separator, question = text.rpartition("\nQuestion: ")
        if not separator or not question.endswith("?") or record["gold"] not in (0, 1):
            raise _malformed("boolq", path, f"line {index + 1}", "is not 'Passage: ...\\nQuestion: ...?' with gold 0/1")
        records.append({"question": question[:-1], "passage": passage, "idx": index, "label": record["gold"]})
    features = datasets.Features(
        {
            "question": _STRING,
            "passage": _STRING,
            "idx": datasets.Value("int32"),
            "label": datasets.ClassLabel(names=["False", "True"]),
        }
    )
    return _split("validation", records, features)


_COPA_QUESTIONS = {"because": "cause", "therefore": "effect"}


def copa(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """COPA `validation` (aps/super_glue, copa) from llm-foundry's `{"query", "choices", "gold"}` lines.

    llm-foundry wrote `query` as premise[:-1] + ", because|therefore" and each choice with its first
    letter lowered. Rebuilt: `premise` is the text before the ", " + connective, plus "." (COPA's final
    full stop; the harness drops the last character again); `question` is cause for "because",
    effect for "therefore"; `choice1`/`choice2` get their first letter upper-cased again (COPA
    alternatives are sentences, "i" was "I"; the harness lowers it back); `label` is `gold`; `idx` the
    0-based line number (the file is in SuperGLUE order). The prompt and choices are the harness's exactly.
    """
    path = _local_path("copa", eval_data)
    records = []
    for index, record in enumerate(_read_jsonl("copa", path, ("query", "choices", "gold"))):
        premise_stem, _, connective = record["query"].rpartition(", ")
        choices = record["choices"]
        if connective not in _COPA_QUESTIONS or len(choices) != 2 or record["gold"] not in (0, 1):
            raise _malformed("copa", path, f"line {index + 1}", "is not '<premise>, because|therefore' with 2 choices")
        choice1, choice2 = (choice[:1].upper() + choice[1:] for choice in choices)
        records.append(
            {
                "premise": premise_stem + ".",
                "choice1": choice1,
                "choice2": choice2,
                "question": _COPA_QUESTIONS[connective],
                "idx": index,
                "label": record["gold"],
            }
        )
    features = datasets.Features(
        {
            "premise": _STRING,
            "choice1": _STRING,
            "choice2": _STRING,
            "question": _STRING,
            "idx": datasets.Value("int32"),
            "label": datasets.ClassLabel(names=["choice1", "choice2"]),
        }
    )
    return _split("validation", records, features)


def piqa(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """PIQA `validation` (baber/piqa) from the official `valid.jsonl` and `valid-labels.lst`.

    Nothing is rebuilt: `goal`, `sol1`, `sol2` come from line i of the jsonl and `label` (0 = sol1,
    1 = sol2) from line i of the labels file, which must have as many lines.
    """
    questions_path = _local_path("piqa", eval_data, 0)
    labels_path = _local_path("piqa", eval_data, 1)
    questions = _read_jsonl("piqa", questions_path, ("goal", "sol1", "sol2"))
    labels = labels_path.read_text(encoding="utf-8").split()
    if len(labels) != len(questions) or any(label not in ("0", "1") for label in labels):
        raise _malformed(
            "piqa", labels_path, "", f"must hold one label 0/1 per line of {questions_path.name} ({len(questions)})"
        )
    records = [
        {"goal": question["goal"], "sol1": question["sol1"], "sol2": question["sol2"], "label": int(label)}
        for question, label in zip(questions, labels, strict=True)
    ]
    features = datasets.Features({"goal": _STRING, "sol1": _STRING, "sol2": _STRING, "label": datasets.Value("int64")})
    return _split("validation", records, features)


_SCIQ_FIELDS = ("question", "distractor3", "distractor1", "distractor2", "correct_answer", "support")


def sciq(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """SciQ `test` (allenai/sciq) from AI2's original `test.json` (a JSON array); nothing is rebuilt."""
    path = _local_path("sciq", eval_data)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise _malformed("sciq", path, "", f"is not valid JSON ({error.msg})") from None
    if not isinstance(items, list) or not items:
        raise _malformed("sciq", path, "", "is not a non-empty JSON array of questions")
    for position, item in enumerate(items):
        if not isinstance(item, dict) or any(not isinstance(item.get(field), str) for field in _SCIQ_FIELDS):
            raise _malformed(
                "sciq", path, f"item {position}", f"lacks one of the string fields {', '.join(_SCIQ_FIELDS)}"
            )
    records = [{field: item[field] for field in _SCIQ_FIELDS} for item in items]
    return _split("test", records, datasets.Features({field: _STRING for field in _SCIQ_FIELDS}))


_RTE_FIELDS = ("sentence1", "sentence2", "label", "idx")


def rte(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """RTE `validation` (nyu-mll/glue, rte) from the Hub dataset's own parquet export; nothing is rebuilt."""
    path = _local_path("rte", eval_data)
    try:
        table = pyarrow.parquet.read_table(path)
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise _malformed("rte", path, "", f"is not a readable parquet file ({error})") from None
    if any(field not in table.column_names for field in _RTE_FIELDS):
        raise _malformed("rte", path, "", f"lacks one of the columns {', '.join(_RTE_FIELDS)}")
    records = table.select(list(_RTE_FIELDS)).to_pylist()
    features = datasets.Features(
        {
            "sentence1": _STRING,
            "sentence2": _STRING,
            "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
            "idx": datasets.Value("int32"),
        }
    )
    return _split("validation", records, features)


# The sentence the ActivityNet context breaks off in: after the last sentence end ('.', '!' or '?',
# perhaps closing a quote), a lower-case fragment with no sentence end of its own ("... on a roof. he").
_HELLASWAG_FRAGMENT = re.compile(r'(?P<head>.*[.!?]"?) (?P<fragment>[a-z][^.!?]*)', re.DOTALL)


def hellaswag(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """HellaSwag `validation` (Rowan/hellaswag) from the llama.cpp text export, as `{"ctx", "label", "endings"}`.

    The harness builds the context as activity_label + ": " + ctx_a + " " + ctx_b.capitalize(), then
    removes the WikiHow tags. The export kept activity_label + ": " + ctx with the tags already removed,
    where ctx = ctx_a + " " + ctx_b, so only where ctx_a ends and ctx_b starts is lost; it matters only
    through capitalize(). Rebuilt: `activity_label` is the text before the first ": "; `ctx_b` is the
    ActivityNet sentence fragment that ends the context (lower-case first letter, after the last sentence
    end, e.g. "he" in "A man is sitting on a roof. he"), and `ctx_b` is "" where there is none (WikiHow
    contexts, or a fragment that capitalize() would not change, such as '" power dribble' or "2 a guy");
    `ctx_a` is the rest. On the 10,042 items this finds 3,236 fragments, none with an upper-case letter
    that capitalize() would lower; so a context is the harness's wherever the fragment is the whole Hub
    `ctx_b` (ActivityNet's `ctx_b` is the lower-case start of the next caption sentence; this cannot be
    checked without the Hub file). `endings` and `label` (a string, as on the Hub) are as exported; the
    harness's tag removal runs again on all fields (a no-op except for stray brackets the export left,
    which it removes as the harness does). Not rebuildable: llama.cpp stripped the tags with other rules
    than the harness, so an ending that began with a tag keeps a leading space in the harness
    (" Include ...") but not here ("Include ..."), and rare tag placements (a context starting with
    "[title]") may differ in a space or full stop.
    """
    path = _local_path("hellaswag", eval_data)
    records = []
    for line_number, record in enumerate(_read_jsonl("hellaswag", path, ("ctx", "label", "endings")), start=1):
        activity_label, separator, context = record["ctx"].partition(": ")
        if not separator or len(record["endings"]) != 4 or str(record["label"]) not in ("0", "1", "2", "3"):
            raise _malformed("hellaswag", path, f"line {line_number}", "is not '<activity>: <context>' with 4 endings")
        fragment = _HELLASWAG_FRAGMENT.fullmatch(context)
        context_a, context_b = (fragment["head"], fragment["fragment"]) if fragment else (context, "")
        records.append(
            {
                "activity_label": activity_label,
                "ctx_a": context_a,
                "ctx_b": context_b,
                "ctx": context,
                "endings": list(record["endings"]),
                "label": str(record["label"]),
            }
        )
    features = datasets.Features(
        {
            "activity_label": _STRING,
            "ctx_a": _STRING,
            "ctx_b": _STRING,
            "ctx": _STRING,
            "endings": datasets.List(_STRING),
            "label": _STRING,
        }
    )
    return _split("validation", records, features)


def lambada_openai(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """LAMBADA (OpenAI's detokenized version) `test` (EleutherAI/lambada_openai, default); nothing is rebuilt."""
    path = _local_path("lambada_openai", eval_data)
    records = [{"text": record["text"]} for record in _read_jsonl("lambada_openai", path, ("text",))]
    return _split("test", records, datasets.Features({"text": _STRING}))


def _wikitext_raw_lines(path: Path) -> list[str]:
    """The lines of WikiText-2's `wiki.test.raw`, rebuilt from the dump of the Hub `test` rows.

    The dump wrote every Hub row followed by "\\n". A Hub row is a raw line with its own "\\n" or, for a
    blank raw line, "" (the Hub loader empties whitespace-only rows). So a non-empty dump line is a raw
    line, followed by one empty dump line; any other empty dump line is a blank raw line, which the raw
    file writes as a single space (as the tokenized `wiki.test.tokens` shows: same 4,358 lines, same
    blank lines). The dump lacks the Hub split's last row, a blank line.
    """
    dump_lines = path.read_text(encoding="utf-8").split("\n")
    if dump_lines[-1] != "":
        raise _malformed("wikitext", path, "", "does not end with a newline")
    dump_lines.pop()  # what follows the last "\n"
    raw_lines, position = [], 0
    while position < len(dump_lines):
        line = dump_lines[position]
        if line == "":
            raw_lines.append(" ")
            position += 1
            continue
        if position + 1 >= len(dump_lines) or dump_lines[position + 1] != "":
            raise _malformed(
                "wikitext", path, f"line {position + 1}", "is not followed by the empty line a Hub row adds"
            )
        raw_lines.append(line)
        position += 2
    return [*raw_lines, " "]


def _is_article_title(line: str) -> bool:
    """A top-level heading " = Title = " (section headings " = = Title = = " are not)."""
    heading = line.replace("= = =", "===").replace("= =", "==").strip()
    return heading.startswith("= ") and heading.endswith(" =")


def wikitext(eval_data: str | None = None, **_) -> datasets.DatasetDict:
    """WikiText-2 `test` by article (EleutherAI/wikitext_document_level, wikitext-2-raw-v1): 62 pages.

    Rebuilt as that dataset's builder does from `wiki.test.raw`: the file is split at "\\n" (so the last
    piece is the "" after the final newline) and a new page starts at each article title line, a page
    being its lines joined with "\\n"; an empty stretch before the first title is dropped. The local
    `wikitext2_test_docs.jsonl` groups the rows differently (54 pages, other joins), so it is not used.
    """
    path = _local_path("wikitext", eval_data)
    pages, page_lines = [], []
    for line in [*_wikitext_raw_lines(path), ""]:
        if _is_article_title(line):
            page = "\n".join(page_lines)
            if page.strip():
                pages.append(page)
            page_lines = []
        page_lines.append(line)
    pages.append("\n".join(page_lines))
    return _split("test", [{"page": page} for page in pages], datasets.Features({"page": _STRING}))
