"""The paper's nine harness tasks on local data (attnlab.paper_tasks): every task builds through the harness's
TaskManager with the dataset's stated size; prompts, choices and targets are the harness's format, written out
by hand for a few documents and compared with the harness's own task definition (its YAML and helpers, fed the
same documents) on many; gold labels come from the right field; missing data is one actionable ValueError.

Skipped when the shared eval data folder (../shared/data/eval) is absent. No model runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

EVAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eval"
if not EVAL_DATA.is_dir():
    pytest.skip(f"no local eval data at {EVAL_DATA}", allow_module_level=True)

import lm_eval
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from attnlab.paper_tasks import LOCAL_FILES, PAPER_TASKS_DIR, check_eval_data, hooks

# The size of the split each task scores, as the datasets' SOURCE.md files state it (WikiText: the 62 article
# titles of the WikiText-2 test set, counted in the independent tokenized copy below).
EXPECTED_DOCS = {
    "arc_easy": 2376,
    "boolq": 3270,
    "copa": 100,
    "piqa": 1838,
    "sciq": 1000,
    "rte": 277,
    "hellaswag": 10042,
    "wikitext": 62,
    "lambada_openai": 5153,
}
HARNESS_TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"
HARNESS_YAMLS = {
    "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "copa": "super_glue/copa/default.yaml",
    "piqa": "piqa/piqa.yaml",
    "sciq": "sciq/sciq.yaml",
    "rte": "glue/rte/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "wikitext": "wikitext/wikitext.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml",
}
SPLIT_KEYS = ("training_split", "validation_split", "test_split")


def _jsonl(relative_path: str) -> list[dict]:
    return [json.loads(line) for line in (EVAL_DATA / relative_path).read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tasks() -> dict:
    manager = TaskManager(
        include_path=[str(PAPER_TASKS_DIR)], include_defaults=False, metadata={"eval_data": str(EVAL_DATA)}
    )
    return manager.load(list(LOCAL_FILES))["tasks"]


def _scored_docs(task) -> list[dict]:
    # The documents the task scores, as built when the task was (`eval_docs` would run process_docs again).
    return task.task_docs.to_list()


@pytest.fixture(scope="module")
def docs(tasks) -> dict:
    return {name: _scored_docs(task) for name, task in tasks.items()}


def _sample(items: list) -> list:
    """About 100 items spread over the list (rendering every document through jinja would be slow)."""
    return items[:: max(1, len(items) // 100)]


def _rendered(task, doc) -> tuple:
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    return task.doc_to_text(doc), choices, task.doc_to_target(doc)


def test_every_task_builds_with_the_stated_size(tasks, docs):
    assert sorted(tasks) == sorted(EXPECTED_DOCS)
    for name, expected in EXPECTED_DOCS.items():
        assert tasks[name].config.task == name
        assert len(docs[name]) == expected, name


def test_arc_easy_prompts(tasks, docs):
    task, records = tasks["arc_easy"], _jsonl("arc_easy/arc_easy.jsonl")
    assert _rendered(task, docs["arc_easy"][1]) == (
        (
            "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory"
            " system?\nAnswer:"
        ),
        ["safety goggles", "breathing mask", "rubber gloves", "lead apron"],
        1,
    )
    assert len(records) == len(docs["arc_easy"])
    for doc, record in _sample(list(zip(docs["arc_easy"], records, strict=True))):
        assert _rendered(task, doc) == (record["query"] + "\nAnswer:", record["choices"], record["gold"])
    assert [doc["choices"]["label"].index(doc["answerKey"]) for doc in docs["arc_easy"]] == [
        record["gold"] for record in records
    ]


def test_boolq_prompts(tasks, docs):
    task = tasks["boolq"]
    text, choices, target = _rendered(task, docs["boolq"][0])
    assert text.startswith("All biomass goes through at least some of these steps: it needs to be grown, collected,")
    assert text.endswith(
        "concluded that producing ethanol from corn uses much less petroleum than producing gasoline."
        "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"
    )
    assert (choices, target) == (["no", "yes"], 0)
    golds = [record["gold"] for record in _jsonl("boolq/boolq.jsonl")]
    assert [doc["label"] for doc in docs["boolq"]] == golds
    assert all(task.doc_to_target(doc) == doc["label"] for doc in _sample(docs["boolq"]))


def test_copa_prompts_and_rebuilt_fields(tasks, docs):
    task, copa = tasks["copa"], docs["copa"]
    assert _rendered(task, copa[0]) == (
        "The man turned on the faucet therefore",
        [" the toilet filled with water.", " water flowed from the spout."],
        " water flowed from the spout.",
    )
    assert _rendered(task, copa[4]) == (
        "The hamburger meat browned because",
        [" the cook froze it.", " the cook grilled it."],
        " the cook grilled it.",
    )
    assert {key: copa[3][key] for key in ("premise", "choice1", "choice2", "question", "idx", "label")} == {
        "premise": "I wanted to conserve energy.",
        "choice1": "I swept the floor in the unoccupied room.",
        "choice2": "I shut off the light in the unoccupied room.",
        "question": "effect",
        "idx": 3,
        "label": 1,
    }
    assert task.doc_to_choice(copa[3])[1] == " i shut off the light in the unoccupied room."
    # llm-foundry's query is the harness's prompt with a comma before the connective.
    for doc, record in zip(copa, _jsonl("copa/copa.jsonl"), strict=True):
        stem, _, connective = record["query"].rpartition(", ")
        assert task.doc_to_text(doc) == f"{stem} {connective}"
        assert task.doc_to_choice(doc) == [" " + choice for choice in record["choices"]]
        assert task.doc_to_target(doc) == " " + record["choices"][record["gold"]]


def test_piqa_prompts_and_labels_file(tasks, docs):
    task = tasks["piqa"]
    labels = (EVAL_DATA / "piqa/valid-labels.lst").read_text().split()
    assert [doc["label"] for doc in docs["piqa"]] == [int(label) for label in labels]
    assert all(task.doc_to_target(doc) == doc["label"] for doc in _sample(docs["piqa"]))
    assert _rendered(task, docs["piqa"][1]) == (
        "Question: dresser\nAnswer:",
        ["replace drawer with bobby pin ", "finish, woodgrain with  bobby pin "],
        1,
    )


def test_sciq_prompts(tasks, docs):
    task, sciq = tasks["sciq"], docs["sciq"]
    text, choices, target = _rendered(task, sciq[0])
    assert text.startswith("Oxidants and Reductants Compounds that are capable of accepting electrons, such as O 2")
    assert text.endswith(
        "saylor. org/books.\nQuestion: Compounds that are capable of accepting electrons, such as o 2 or f2,"
        " are called what?\nAnswer:"
    )
    assert (choices, target) == (["antioxidants", "Oxygen", "residues", "oxidants"], 3)
    assert task.doc_to_text(sciq[35]) == (
        "\nQuestion: In what type of animals may a body cavity be present or absent?\nAnswer:"
    )  # an empty support passage
    assert task.doc_to_choice(sciq[35])[3] == "triploblastic"


def test_rte_prompts(tasks, docs):
    task = tasks["rte"]
    assert _rendered(task, docs["rte"][0]) == (
        (
            "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, according to the"
            " Christopher Reeve Foundation.\nQuestion: Christopher Reeve had an accident. True or False?\nAnswer:"
        ),
        ["True", "False"],
        1,
    )
    targets = [task.doc_to_target(doc) for doc in docs["rte"]]
    assert (targets.count(0), targets.count(1)) == (146, 131)  # entailment, not_entailment (SOURCE.md)
    assert docs["rte"][276]["idx"] == 276


def test_hellaswag_prompts(tasks, docs):
    task, hellaswag = tasks["hellaswag"], docs["hellaswag"]
    assert _rendered(task, hellaswag[0]) == (
        "Roof shingle removal: A man is sitting on a roof. He",
        [
            "is using wrap to wrap a pair of skis.",
            "is ripping level tiles off.",
            "is holding a rubik's cube.",
            "starts pulling up roofing on a roof.",
        ],
        3,
    )
    assert (
        task.doc_to_text(hellaswag[1])
        == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    )
    assert task.doc_to_text(hellaswag[249]).endswith("while a man pulls the camel. Then")
    assert task.doc_to_text(hellaswag[2346]) == 'Camel ride: . " a camel ride - desrt of doha - qatar "'
    # WikiHow: no trailing fragment; a bracket the export left is removed and the double space halved.
    assert task.doc_to_text(hellaswag[3505]) == (
        "Family Life: How to entertain a toddler. Ask the toddler what he or she would like to do instead of doing"
        " what you would like to do.. Visit a site like to find loads of creative activities for toddlers and"
        " preschoolers.. Choose small, simple games like candy land or chutes and ladders."
    )
    records = _jsonl("hellaswag/hellaswag_val.jsonl")
    assert [doc["gold"] for doc in hellaswag] == [record["label"] for record in records]
    assert all(task.doc_to_target(doc) == doc["gold"] for doc in _sample(hellaswag))


def test_lambada_prompts(tasks, docs):
    task = tasks["lambada_openai"]
    text, _, target = _rendered(task, docs["lambada_openai"][0])
    assert text.startswith(
        "In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel.\n\n"
    )
    assert text.endswith("his mouth curved in a confident grin, I don't care about")
    assert target == " signs"


def test_wikitext_pages_match_the_tokenized_copy(tasks, docs):
    task, pages = tasks["wikitext"], [doc["page"] for doc in docs["wikitext"]]
    assert pages[0].startswith(" = Robert Boulter = \n \n Robert Boulter is an English film , television and theatre")
    assert task.doc_to_text(docs["wikitext"][0]) == ""
    assert task.doc_to_target(docs["wikitext"][0]).startswith(
        " = Robert Boulter =\n\nRobert Boulter is an English film, television and theatre actor. He had a guest-starring"
    )
    assert pages[-1].endswith(", and Eddie Pelkey . \n \n")
    # wiki.test.tokens is an independent copy of the same text: its lines, split into articles by the harness
    # dataset's rule, must be ours line for line, differing only where rare words became <unk>.
    tokenized_lines = (EVAL_DATA / "wikitext2/test.txt").read_text(encoding="utf-8").split("\n")
    our_lines = "\n".join(pages).split("\n")
    assert tokenized_lines[0] == " "  # the blank line before the first title, which the harness dataset drops
    assert len(our_lines) == len(tokenized_lines) - 1 == 4358
    for ours, tokenized in zip(our_lines, tokenized_lines[1:], strict=True):
        # split(): two lines have a double space where the tokenized copy has an <unk> and one space.
        our_words, tokenized_words = ours.split(), tokenized.split()
        assert (ours == " ") == (tokenized == " ")
        assert all(word == other or other == "<unk>" for word, other in zip(our_words, tokenized_words, strict=True))
    titles = [line for line in our_lines if hooks._is_article_title(line)]
    assert len(titles) == len([line for line in tokenized_lines if hooks._is_article_title(line)]) == 62
    assert [page.split("\n")[0] for page in pages] == titles
    (page_words, page_bytes) = (len(re.split(r"\s+", pages[0])), len(pages[0].encode()))
    assert task.process_results(docs["wikitext"][0], [-12.5]) == {
        "word_perplexity": (-12.5, page_words),
        "byte_perplexity": (-12.5, page_bytes),
        "bits_per_byte": (-12.5, page_bytes),
    }


def _scored_split(config: dict) -> tuple[str, str]:
    """(config key, split name) of the split a task scores: the test split if it has one, else validation."""
    key = "test_split" if config.get("test_split") else "validation_split"
    return key, config[key]


def _harness_task(name: str) -> tuple[ConfigurableTask, tuple[str, str]]:
    """The harness's own definition of `name` (its YAML and helpers) reading our local documents, and the
    split that definition scores."""
    config = load_yaml(HARNESS_TASKS_DIR / HARNESS_YAMLS[name], resolve_func=True)
    scored_split = _scored_split(config)
    for key in ("dataset_path", "dataset_name", "tag", *SPLIT_KEYS):
        config.pop(key, None)
    config.update(dict([scored_split]))  # only the scored split is local
    config["custom_dataset"] = getattr(hooks, name)
    config["metadata"] = {**config.get("metadata", {}), "eval_data": str(EVAL_DATA)}
    return ConfigurableTask(config=config), scored_split


@pytest.mark.parametrize("name", list(HARNESS_YAMLS))
def test_same_prompts_metrics_and_split_as_the_harness_task(name, tasks, docs):
    ours = tasks[name]
    theirs, their_split = _harness_task(name)
    assert _scored_split({key: getattr(ours.config, key) for key in SPLIT_KEYS}) == their_split
    assert [key for key in SPLIT_KEYS if getattr(ours.config, key)] == [their_split[0]]
    for key in ("output_type", "target_delimiter", "fewshot_delimiter", "metric_list"):
        assert getattr(ours.config, key) == getattr(theirs.config, key), key
    assert ours.config.metadata["version"] == theirs.config.metadata["version"]
    their_docs = _scored_docs(theirs)
    assert their_docs == docs[name]  # the same documents, after each side's process_docs (HellaSwag's)
    for our_doc, their_doc in _sample(list(zip(docs[name], their_docs, strict=True))):
        assert _rendered(ours, our_doc) == _rendered(theirs, their_doc)
        if name == "wikitext":
            assert ours.process_results(our_doc, [-3.0]) == theirs.process_results(their_doc, [-3.0])


def test_check_eval_data_names_the_missing_file(tmp_path):
    check_eval_data(EVAL_DATA)
    with pytest.raises(ValueError, match="does not exist"):
        check_eval_data(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"task arc_easy: missing arc_easy/arc_easy\.jsonl"):
        check_eval_data(tmp_path)
    for relative_paths in LOCAL_FILES.values():  # empty stand-ins: only their presence is checked
        for relative_path in relative_paths:
            (tmp_path / relative_path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / relative_path).touch()
    check_eval_data(tmp_path)
    (tmp_path / "piqa/valid-labels.lst").unlink()
    with pytest.raises(ValueError, match=r"task piqa: missing piqa/valid-labels\.lst") as error:
        check_eval_data(tmp_path)
    assert "\n" not in str(error.value)
    check_eval_data(tmp_path, tasks=["arc_easy", "wikitext"])
    with pytest.raises(ValueError, match="no local eval data for task"):
        check_eval_data(tmp_path, tasks=["mmlu"])


@pytest.mark.parametrize("name", list(LOCAL_FILES))
def test_hooks_need_eval_data(name):
    with pytest.raises(ValueError, match="needs --eval-data DIR"):
        getattr(hooks, name)(eval_data=None, version=1.0)


def test_hooks_reject_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match=r"task copa: missing copa/copa\.jsonl"):
        hooks.copa(eval_data=str(tmp_path))
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy/arc_easy.jsonl").write_text(
        '{"query": "Question: Why?", "choices": ["a"], "gold": 0}\n{oops\n'
    )
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        hooks.arc_easy(eval_data=str(tmp_path))
    (tmp_path / "copa").mkdir()
    (tmp_path / "copa/copa.jsonl").write_text('{"query": "It rained so", "choices": ["a.", "b."], "gold": 0}\n')
    with pytest.raises(ValueError, match=re.escape("line 1 is not '<premise>, because|therefore'")):
        hooks.copa(eval_data=str(tmp_path))
