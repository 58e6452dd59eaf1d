"""`custom_dataset` hooks the task YAMLs in this folder name with `!function hooks.<name>`.

The harness calls a hook with the task's metadata and `dataset_kwargs` as keyword arguments; the hooks
read `corpus` (default "builtin") or `path`, and ignore the rest (`version`, ...).
"""

from __future__ import annotations

import datasets

from attnlab.tasks import rolling_perplexity_results, task_items, text_file_items

__all__ = ["cloze", "heldout", "lastword", "rolling_perplexity_results", "textfile"]


def _test_split(items: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})


def lastword(corpus: str = "builtin", **_) -> datasets.DatasetDict:
    return _test_split(task_items("lastword", corpus))


def cloze(corpus: str = "builtin", **_) -> datasets.DatasetDict:
    return _test_split(task_items("cloze", corpus))


def heldout(corpus: str = "builtin", **_) -> datasets.DatasetDict:
    return _test_split(task_items("heldout", corpus))


def textfile(path: str | None = None, **_) -> datasets.DatasetDict:
    if path is None:
        raise ValueError("the textfile task needs metadata 'path' (attnlab eval --ppl-data FILE)")
    return _test_split(text_file_items(path))
