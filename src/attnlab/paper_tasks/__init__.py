"""The paper's nine lm-evaluation-harness tasks, read offline from local copies of their datasets.

The YAML files next to this module are the harness's own task definitions (same `task:` names, prompts,
choices, targets, metrics, split and version) with one change: instead of `dataset_path`, each names a
`custom_dataset` hook (`hooks.py`) that reads the task's file(s) from a local eval-data folder, given to
the harness as task metadata:

    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_path=[str(PAPER_TASKS_DIR)], include_defaults=False,
                          metadata={"eval_data": "/path/to/eval"})
    task = manager.load(["arc_easy"])["tasks"]["arc_easy"]

The eval-data folder has one subfolder per dataset, laid out as `LOCAL_FILES` says. Where a local copy
lost fields of the Hub dataset the harness normally downloads, the hooks rebuild them (see `hooks.py`);
the few prompts that cannot be rebuilt byte for byte (BoolQ passage titles, some HellaSwag WikiHow
endings) are documented there.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

PAPER_TASKS_DIR = Path(__file__).resolve().parent

# Harness task name -> its file(s), relative to the eval-data folder (`attnlab eval --eval-data DIR`).
LOCAL_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy": ("arc_easy/arc_easy.jsonl",),
    "boolq": ("boolq/boolq.jsonl",),
    "copa": ("copa/copa.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "sciq": ("sciq/test.json",),
    "rte": ("rte/validation.parquet",),
    "hellaswag": ("hellaswag/hellaswag_val.jsonl",),
    # The raw WikiText-2 test rows; the hook groups them into articles exactly as the harness's
    # `EleutherAI/wikitext_document_level` does (wikitext2_test_docs.jsonl groups them differently).
    "wikitext": ("wikitext2/wiki.test.raw.hf_rows.txt",),
    "lambada_openai": ("lambada_openai/lambada_test.jsonl",),
}


def check_eval_data(folder: str | Path, tasks: Iterable[str] | None = None) -> None:
    """Raise ValueError (one line) unless `folder` holds every file that `tasks` (default: all nine) read."""
    names = list(LOCAL_FILES) if tasks is None else list(tasks)
    unknown = [name for name in names if name not in LOCAL_FILES]
    if unknown:
        raise ValueError(f"no local eval data for task(s) {', '.join(unknown)}; known: {', '.join(LOCAL_FILES)}")
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(
            f"eval data folder {folder} does not exist; --eval-data must name a folder holding e.g. "
            f"{LOCAL_FILES['arc_easy'][0]}"
        )
    for name in names:
        for relative_path in LOCAL_FILES[name]:
            if not (folder / relative_path).is_file():
                raise ValueError(
                    f"task {name}: missing {relative_path} in eval data folder {folder} (expected {folder / relative_path})"
                )
