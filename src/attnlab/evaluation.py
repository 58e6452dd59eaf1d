"""Evaluation through lm-evaluation-harness: the paper's nine tasks, offline tasks, skip mode, ppl vs context.

    selection = resolve_tasks("paper")                 # or "lastword,cloze,heldout", a task YAML path, ...
    record = evaluate_checkpoint("runs/tiny", selection, limit=100)
    record["results"]["lastword"]["acc,none"]

The model goes to the harness as an ordinary HF causal LM: `AttnLabLM` is the harness's own `HFLM` with
one change (generation recomputes the sequence until attnlab has decoding caches), so every score is the
harness's. A record keeps the harness's result structure (`results[task]["acc,none"]`,
`"acc_stderr,none"`, `"word_perplexity,none"`, ...) and adds `attnlab` metadata: checkpoint, layer
pattern, skip mode, parameter count, versions. Paper §5: zero-shot, harness defaults.

Offline use: the built-in tasks (`attnlab.tasks`) need no network, and any task YAML whose data files are
local works as well. A harness task whose dataset is neither local nor cached fails up front with one
line naming the task, instead of the Hub client's minute of retries.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import difflib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError

from . import synthetic
from .checkpoint import CHECKPOINT_PATTERN
from .environment import versions
from .tasks import BUILTIN_TASKS, TASKS_DIR

# Paper §5 and Table 1: seven zero-shot NLU tasks, then WikiText and LAMBADA (OpenAI).
PAPER_NLU_TASKS = ("arc_easy", "boolq", "copa", "piqa", "sciq", "rte", "hellaswag")
PAPER_TASKS = (*PAPER_NLU_TASKS, "wikitext", "lambada_openai")
TASK_LISTS = {"paper": PAPER_TASKS, "offline": BUILTIN_TASKS}
PPL_TASK = "textfile"  # attnlab/tasks/textfile.yaml: rolling perplexity of one file


@dataclass(frozen=True)
class TaskSelection:
    """What to evaluate: harness task names, and the folders whose task YAMLs the harness must index."""

    names: tuple[str, ...]
    include_paths: tuple[str, ...]
    harness_tasks: bool  # some name is none of ours: index the harness's own (large) task folder too
    eval_data: str | None = None  # local copies of the paper's datasets (attnlab.paper_tasks)


def resolve_tasks(
    spec: str | Sequence[str], eval_data: str | Path | None = None, allow_task_code: bool = False
) -> TaskSelection:
    """Expand a task list: comma-separated names, `paper`, `offline`, built-in task names, YAML paths.

    With `eval_data` (a folder of local copies of the paper's datasets, see `attnlab.paper_tasks`), the
    paper's nine tasks are read from there instead of the Hub, under the same names, prompts and metrics.

    A path ending in .yaml/.yml is a harness task file: its `task:` name is evaluated, and the YAML files
    beside it (not the folders below: the harness indexes recursively) are indexed, so that its `include:`d
    YAMLs resolve. Task files run Python only with `allow_task_code`: then the `.py` files beside them are
    indexed too, for their `!function` helpers; without it a task file (or a sibling YAML) that names a
    `!function` is refused, and no `.py` file is reachable. attnlab's own and the paper's tasks are trusted.
    Raises ValueError with one line.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not parts:
        raise ValueError("no tasks given; use --tasks paper, offline, a task name or a task YAML file")
    names: list[str] = []
    local_names = {*BUILTIN_TASKS, PPL_TASK}  # tasks that the include paths provide
    include_paths = [str(TASKS_DIR)]
    for part in parts:
        if part in TASK_LISTS:
            names.extend(TASK_LISTS[part])
        elif part.endswith((".yaml", ".yml")):
            path = Path(part)
            names.append(task_name_in_yaml(path))
            local_names.add(names[-1])
            if not allow_task_code:
                _refuse_task_code(path)
            include_paths.append(_task_folder_for(path, with_code=allow_task_code))
        else:
            names.append(part)
    names = list(dict.fromkeys(names))  # in order, once each
    if eval_data is not None:
        from .paper_tasks import LOCAL_FILES, PAPER_TASKS_DIR, check_eval_data

        check_eval_data(eval_data, [name for name in names if name in LOCAL_FILES])
        include_paths.append(str(PAPER_TASKS_DIR))
        local_names.update(LOCAL_FILES)
        eval_data = str(Path(eval_data).resolve())
    return TaskSelection(
        tuple(names),
        tuple(dict.fromkeys(include_paths)),
        harness_tasks=any(name not in local_names for name in names),
        eval_data=eval_data,
    )


def _task_folder_for(path: Path, with_code: bool) -> str:
    """A private folder of links to the task file's siblings (*.yaml, *.yml, and *.py `with_code`), for the
    harness to index.

    Indexing the file's own folder would index everything below it too (a repository with a virtual
    environment holds thousands of task YAMLs). The folder is removed when the process exits.
    """
    folder = Path(tempfile.mkdtemp(prefix="attnlab-tasks-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    suffixes = (".yaml", ".yml", ".py") if with_code else (".yaml", ".yml")
    for sibling in path.resolve().parent.iterdir():
        if sibling.is_file() and sibling.suffix in suffixes:
            (folder / sibling.name).symlink_to(sibling)
    return str(folder)


def _refuse_task_code(path: Path) -> None:
    """One line if the task file, or a YAML beside it that it may include, runs Python (`!function`)."""
    siblings = sorted(p for p in path.resolve().parent.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml"))
    for candidate in [path.resolve(), *siblings]:
        try:
            text = candidate.read_text(errors="replace")
        except OSError:
            continue
        if "!function" in text:
            raise ValueError(
                f"task file {candidate} runs Python code (!function); read it, and pass --allow-task-code "
                "if you trust it"
            )


class _HarnessYamlLoader(yaml.SafeLoader):
    """Reads harness task YAMLs: `!function module.name` tags parse as plain strings."""


_HarnessYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def task_name_in_yaml(path: Path) -> str:
    """The `task:` name of a harness task YAML file; ValueError (one line) when it cannot be one."""
    if not path.is_file():
        raise ValueError(f"task file {path} does not exist")
    try:
        config = yaml.load(path.read_text(encoding="utf-8"), Loader=_HarnessYamlLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"task file {path} does not parse as YAML: {first}") from None
    if not isinstance(config, dict) or not isinstance(config.get("task"), str):
        raise ValueError(f"task file {path} has no 'task: <name>' entry; it is not a harness task YAML")
    return config["task"]


# ---------------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class LoadedCheckpoint:
    model: torch.nn.Module
    tokenizer: object
    path: Path
    trained_seq_len: int | None  # the run's --seq-len, from run_config.yaml beside the checkpoint

    @property
    def context_length(self) -> int:
        """The harness's window: the length the model was trained on (positions beyond it were never
        seen), else its max_position_embeddings."""
        limit = self.model.config.max_position_embeddings
        return min(self.trained_seq_len, limit) if self.trained_seq_len else limit


def _run_folders(path: Path) -> tuple[Path, ...]:
    """Where a checkpoint's run files are: the folder itself, and for `checkpoint-<step>` its run folder.
    Any other folder is read alone: a model copied elsewhere never picks up a neighbour's tokenizer."""
    return (path, path.parent) if CHECKPOINT_PATTERN.match(path.name) else (path,)


def train_settings(path: Path) -> dict:
    """The `train:` section of the run_config.yaml of the run that wrote a checkpoint, or {} if unknown."""
    for folder in _run_folders(path):
        run_config = folder / "run_config.yaml"
        if run_config.is_file():
            try:
                settings = yaml.safe_load(run_config.read_text()) or {}
            except (yaml.YAMLError, UnicodeDecodeError):
                return {}
            train = settings.get("train") if isinstance(settings, dict) else None
            return train if isinstance(train, dict) else {}
    return {}


def trained_seq_len(path: Path) -> int | None:
    """`train.seq_len` of the run that wrote the checkpoint (OUT/run_config.yaml), or None if unknown."""
    value = train_settings(path).get("seq_len")
    return value if isinstance(value, int) and value > 0 else None


def find_tokenizer_folder(path: Path) -> Path:
    """The folder holding the checkpoint's tokenizer: itself, or (for `checkpoint-<step>`) the run folder."""
    for folder in _run_folders(path):
        if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
            return folder
    data = train_settings(path).get("data")
    if isinstance(data, str) and synthetic.is_task_spec(data):
        raise ValueError(
            f"{path} was trained on the synthetic task {data!r}, which has no tokenizer or text; "
            f"score it with `attnlab recall {path}`"
        )
    where = " or ".join(str(folder) for folder in _run_folders(path))
    raise ValueError(f"no tokenizer in {where}; attnlab train saves one in --out (copy it beside the model)")


def check_checkpoint(path: Path) -> dict:
    """The saved config.json of a complete attnlab checkpoint folder (config and safetensors weights); else
    ValueError with one line. Reads no weights."""
    config_file = path / "config.json"
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json; give a training output folder or its checkpoint-<step> folder")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{config_file} is not a JSON model config") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a JSON model config")
    model_type = config.get("model_type")
    if model_type != "attnlab":
        raise ValueError(f"{path} holds a {model_type!r} model, not an attnlab one (model_type 'attnlab')")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")):
            raise ValueError(
                f"{path} holds pickled PyTorch weights (*.bin), which attnlab does not load (unpickling can run "
                "code); in a session you trust, re-save them: AutoModelForCausalLM.from_pretrained(path)"
                ".save_pretrained(path)"
            )
        raise ValueError(f"{path} has a config but no weights (*.safetensors); the save did not finish")
    return config


def load_checkpoint(
    checkpoint: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    skip_nonstandard: bool = False,
    with_tokenizer: bool = True,
) -> LoadedCheckpoint:
    """An attnlab model and its tokenizer from a training output folder or one of its checkpoint folders
    (`with_tokenizer=False`: no tokenizer, as for models trained on synthetic tasks; `tokenizer` is None).

    `skip_nonstandard=True` is paper Table 1's "skip": the non-standard layers are removed (identity).
    Raises ValueError with one line for a missing, incomplete or non-attnlab checkpoint.
    """
    import transformers

    import attnlab  # noqa: F401  (registers the attnlab model type with the Auto classes)

    path = Path(checkpoint)
    check_checkpoint(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(find_tokenizer_folder(path)) if with_tokenizer else None
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, skip_nonstandard=skip_nonstandard, use_safetensors=True
        )
    except (OSError, RuntimeError, SafetensorError) as error:  # a truncated copy, or weights of another shape
        raise ValueError(
            f"checkpoint {path}: the weights cannot be read or do not fit its config.json ({_first_line(error)})"
        ) from None
    return LoadedCheckpoint(model.to(device).eval(), tokenizer, path, trained_seq_len(path))


def describe_pattern(mixer_types: Sequence[str]) -> tuple[str, str]:
    """(kind, mixer) of a layer pattern: ("standard", "standard"), ("uniform", m), ("hybrid", m) or ("mixed", ...)."""
    others = sorted(set(mixer_types) - {"standard"})
    if not others:
        return "standard", "standard"
    if len(others) == 1:
        return ("uniform" if "standard" not in mixer_types else "hybrid"), others[0]
    return "mixed", "+".join(others)


# ---------------------------------------------------------------------------------------------------------
# The harness


def _harness_lm_class():
    from lm_eval.models.huggingface import HFLM

    class AttnLabLM(HFLM):
        """The harness's HF causal LM over an attnlab model instance.

        Scoring (loglikelihood, rolling loglikelihood) and generation are HFLM's own (generation through
        `generate` with attnlab's decoding cache); a continuation longer than the window is refused with
        one line instead of the harness's bare assertion.
        """

        def _loglikelihood_tokens(self, requests, *args, **kwargs):
            # The harness asserts this deep inside its loop; say what is wrong and what to do instead.
            for strings, _, continuation_tokens in requests:  # strings: (context, continuation), or None
                if len(continuation_tokens) > self.max_length:
                    text = repr(strings[1][:40]) + "..." if strings else "a rolling window"
                    raise ValueError(
                        f"a continuation of {len(continuation_tokens)} tokens ({text}) does not "
                        f"fit the {self.max_length}-token window; raise --max-length (at most the model's "
                        f"max_position_embeddings, {self.model.config.max_position_embeddings})"
                    )
            return super()._loglikelihood_tokens(requests, *args, **kwargs)

    return AttnLabLM


def harness_lm(loaded: LoadedCheckpoint, batch_size: int | str = 8, max_length: int | None = None):
    """The harness LM object for a loaded checkpoint (`max_length`: context window, default
    `loaded.context_length`; longer inputs lose their left end, as the harness does it).

    `logits_cache=False`: with the cache on, lm-eval 0.4.13 runs requests whose context + continuation
    tokens coincide once, and then scores a shorter continuation on the *first* positions of the longer
    one's logits instead of the last. That is rare within a harness task, but `lastword` and `cloze`
    are cut from the same passages and hit it, so every request gets its own forward pass here.
    """
    with _quiet("lm_eval.models.huggingface"):  # its warning about passing a model instance is expected
        return _harness_lm_class()(
            pretrained=loaded.model,
            tokenizer=loaded.tokenizer,
            batch_size=batch_size,
            max_length=max_length or loaded.context_length,
            logits_cache=False,
        )


@contextlib.contextmanager
def _quiet(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def _quiet_git_probe() -> Iterator[None]:
    """lm-eval records `git describe` of the working folder, and outside a repository git prints "fatal: not
    a git repository" on the terminal, which reads like an error of the evaluation. Probe the same way with
    git's stderr captured (None outside a repository, as the harness records then too)."""
    from lm_eval import evaluator

    def git_commit_hash() -> str | None:
        try:
            probe = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None
        return probe.stdout.strip()

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # a harness version that no longer probes
        yield
        return
    evaluator.get_git_commit_hash = git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Make `datasets` and `huggingface_hub` use their local caches only (fail at once, no retries)."""
    import datasets
    from huggingface_hub import constants

    previous = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = previous


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the duration, then restore them."""
    previous = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@functools.lru_cache(maxsize=4)
def checked_task_manager(selection: TaskSelection, **metadata):
    """A harness TaskManager that knows the selection's tasks (the harness's own only when needed), with
    every task checked by `check_tasks`. Cached: several checkpoints share one (indexing takes seconds)."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(
        include_path=list(selection.include_paths), include_defaults=selection.harness_tasks, metadata=metadata
    )
    manager.attnlab_hub_unreachable = check_tasks(manager, selection)  # run_harness reads the cache only then
    return manager


def check_tasks(manager, selection: TaskSelection) -> str | None:
    """Build every selected task once (which loads its data), so that a failure names its task.

    When the Hugging Face Hub is unreachable, datasets come from the local cache only: a task whose data
    is neither local nor cached fails at once with the reason, instead of after a minute of retries.
    Returns why the Hub is unreachable (None if it was not needed or answers).
    """
    from .data.hub import hub_unreachable_reason

    known = set(manager.all_tasks)
    for name in selection.names:
        if name not in known:
            close = difflib.get_close_matches(name, [*known, *TASK_LISTS], n=3)
            hint = (
                f"; did you mean {', '.join(close)}?" if close else "; see `lm-eval ls tasks` or use a task YAML path"
            )
            raise ValueError(f"unknown task {name!r}{hint}")
    needs_probe = selection.harness_tasks or any(not _is_ours(name, selection) for name in selection.names)
    unreachable = hub_unreachable_reason() if needs_probe else None
    for name in selection.names:
        try:
            with _hub_offline() if unreachable else contextlib.nullcontext(), _quiet("lm_eval"):
                manager.load([name])
        except Exception as error:  # noqa: BLE001  (the harness and datasets raise anything here)
            reason = _first_line(error)
            if not _is_hub_error(error):
                raise ValueError(f"task {name!r} failed to build: {reason}; {_build_hint(name, selection)}") from None
            if unreachable:
                raise ValueError(
                    f"task {name!r} needs data from the Hugging Face Hub, which is unreachable ({unreachable}), "
                    f"and it is not in the local cache ({reason}); offline, use --eval-data DIR for the paper's "
                    f"tasks, the built-in tasks ({', '.join(BUILTIN_TASKS)}) or a task YAML with local data files"
                ) from None
            raise ValueError(f"task {name!r} could not be loaded: {reason}") from None
    return unreachable


def _is_hub_error(error: BaseException) -> bool:
    """Whether an error, or one it was raised from, comes from fetching data through the Hub client: a
    connection failure (`datasets` reports an unreachable Hub or offline mode as ConnectionError), a
    timeout, a file missing from huggingface_hub's cache, or the Hub's answer (no such dataset, gated, an
    HTTP error). A template, YAML or local-file error is not."""
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    hub_errors: tuple[type[BaseException], ...] = (
        ConnectionError,
        TimeoutError,
        LocalEntryNotFoundError,
        HfHubHTTPError,
        DatasetNotFoundError,
    )
    try:  # the Hub client's HTTP library, in the huggingface_hub versions that use httpx
        from huggingface_hub.utils import httpx

        hub_errors += (httpx.TransportError,)
    except (ImportError, AttributeError):
        pass
    seen: set[int] = set()  # a chain can loop back on itself
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, hub_errors):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _is_ours(name: str, selection: TaskSelection) -> bool:
    """A task whose data attnlab makes or reads locally (built-in tasks; paper tasks with --eval-data)."""
    from .paper_tasks import LOCAL_FILES

    return name in (*BUILTIN_TASKS, PPL_TASK) or (selection.eval_data is not None and name in LOCAL_FILES)


def _build_hint(name: str, selection: TaskSelection) -> str:
    """What to check when a task fails to build: where its data comes from."""
    if name in BUILTIN_TASKS:
        return "check --corpus (the built-in tasks read its held-out text)"
    if _is_ours(name, selection):
        return "check --eval-data (the paper tasks' local files)"
    return "check its YAML"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def run_harness(lm, manager, names: Sequence[str], limit: int | float | None, log_samples: bool = False) -> dict:
    """`lm_eval.simple_evaluate` zero-shot on the named tasks; the harness's result dict."""
    import lm_eval

    offline = _hub_offline() if getattr(manager, "attnlab_hub_unreachable", None) else contextlib.nullcontext()
    # Progress bars stay; truncation and config notices go. bootstrap_iters=1000 is one chunk: the harness's
    # process pool for it would only add start-up time (~20 s in a spawned worker of attnlab study).
    with offline, _environment(DISABLE_MULTIPROC="1"), _quiet("lm_eval"), _quiet_git_probe():
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names),
            task_manager=manager,
            limit=limit,
            log_samples=log_samples,
            num_fewshot=0,
            bootstrap_iters=1000,
        )


# ---------------------------------------------------------------------------------------------------------
# Records

# Keys of the harness's result dict that a record keeps (the rest holds task configs with Python objects).
HARNESS_KEYS = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")


def evaluate_checkpoint(
    checkpoint: str | Path,
    selection: TaskSelection | None,
    *,
    limit: int | float | None = None,
    batch_size: int | str = 8,
    device: str = "cpu",
    dtype: str = "float32",
    skip_nonstandard: bool = False,
    ppl_contexts: Sequence[int] = (),
    ppl_data: str | Path | None = None,
    corpus: str = "builtin",
    max_length: int | None = None,
    log_samples: bool = False,
) -> dict:
    """Evaluate one checkpoint: the harness's results for `selection` plus `attnlab` metadata.

    `ppl_contexts` with `ppl_data`: rolling perplexity of that text file with the context window set to
    each length (paper Table 4), under `record["ppl_contexts"]`. `corpus` is the corpus whose held-out
    split the built-in tasks are made from. `max_length` is the harness's context window (default: the
    length the model was trained on, see `LoadedCheckpoint.context_length`). With `log_samples`,
    `record["samples"]` holds the harness's per-sample log (not JSON-clean; `write_samples` writes it).
    """
    if ppl_contexts and ppl_data is None:
        raise ValueError("--ppl-contexts needs --ppl-data FILE (a text file to measure perplexity on)")
    positions = check_checkpoint(Path(checkpoint)).get("max_position_embeddings")
    if max_length is not None and isinstance(positions, int) and not 2 <= max_length <= positions:
        raise ValueError(f"--max-length {max_length} is outside 2..{positions} (the model's max_position_embeddings)")
    # Tasks first: a task that cannot load fails before any model is read.
    manager = checked_task_manager(selection, corpus=corpus, eval_data=selection.eval_data) if selection else None
    loaded = load_checkpoint(checkpoint, device=device, dtype=dtype, skip_nonstandard=skip_nonstandard)
    if ppl_contexts:
        check_perplexity_inputs(loaded, ppl_data, ppl_contexts)  # before the harness spends minutes
    record: dict = {}
    if selection is not None:
        output = run_harness(harness_lm(loaded, batch_size, max_length), manager, selection.names, limit, log_samples)
        record.update({key: output[key] for key in HARNESS_KEYS if key in output})
        if log_samples:
            record["samples"] = output.get("samples", {})
    if ppl_contexts:
        record["ppl_contexts"] = perplexity_by_context(loaded, ppl_data, ppl_contexts, batch_size, corpus)
    record["attnlab"] = {
        **checkpoint_metadata(checkpoint, loaded, skip_nonstandard, device, dtype),
        "max_length": max_length or loaded.context_length,
        "trained_seq_len": loaded.trained_seq_len,
        "tasks": list(selection.names) if selection else [],
        "eval_data": selection.eval_data if selection else None,
        "limit": limit,
        "batch_size": batch_size,
    }
    return record


def checkpoint_metadata(checkpoint, loaded: LoadedCheckpoint, skip_nonstandard: bool, device: str, dtype: str) -> dict:
    """What every results file says about the model it evaluated and how."""
    kind, mixer = describe_pattern(loaded.model.config.mixer_types)
    return {
        "checkpoint": str(checkpoint),
        "mixer_types": list(loaded.model.config.mixer_types),
        "kind": kind,
        "mixer": mixer,
        "skip_nonstandard": bool(skip_nonstandard),
        "parameters": sum(p.numel() for p in loaded.model.parameters()),
        "device": device,
        "dtype": dtype,
        "tokenizer": tokenizer_record(loaded.path) if loaded.tokenizer is not None else None,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def tokenizer_record(checkpoint: Path) -> dict:
    """Which tokenizer an evaluation used: its folder and the SHA-256 of its files (tokenizer*.json)."""
    folder = find_tokenizer_folder(checkpoint)
    digest = hashlib.sha256()
    for path in sorted(folder.glob("tokenizer*.json")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"path": str(folder), "sha256": digest.hexdigest()}


def evaluate_recall(
    checkpoint: str | Path,
    task_spec: str | None = None,
    *,
    num_examples: int = 512,
    batch_size: int = 64,
    device: str = "cpu",
    skip_nonstandard: bool = False,
) -> dict:
    """Accuracy of a checkpoint on held-out examples of a synthetic recall task (`attnlab.synthetic`).

    `task_spec` defaults to the task the run was trained on (its `train.data`); the sequence length and the
    seed are the run's. Returns {"task", "accuracy", "stderr", "chance", "context_guess" (the accuracy of
    guessing among the values in the context), counts…, "attnlab": metadata}. Bad input (a missing
    checkpoint, a bad `task_spec`, a run trained on a corpus and no `task_spec`) is a one-line ValueError
    before any weights are read.
    """
    import transformers

    path = Path(checkpoint)
    check_checkpoint(path)
    train = train_settings(path)
    spec = task_spec if task_spec is not None else train.get("data")
    if task_spec is None and not (isinstance(spec, str) and synthetic.is_task_spec(spec)):
        raise ValueError(
            f"{path} was not trained on a synthetic task (train.data = {spec!r}); give one with --task, "
            "e.g. --task mqar:pairs=8"
        )
    config = transformers.AutoConfig.from_pretrained(path)
    seq_len = trained_seq_len(path) or config.max_position_embeddings
    task = synthetic.parse_task_spec(spec, seq_len)  # a bad --task: one line (an unknown kind names the known ones)
    if task.vocab_size > config.vocab_size:
        raise ValueError(f"task {spec!r} uses {task.vocab_size} tokens but the model has {config.vocab_size}")
    loaded = load_checkpoint(path, device=device, skip_nonstandard=skip_nonstandard, with_tokenizer=False)
    result = synthetic.recall_accuracy(
        loaded.model, task, num_examples, batch_size, device, seed=int(train.get("seed", 0))
    )
    metadata = checkpoint_metadata(checkpoint, loaded, skip_nonstandard, device, "float32")
    return {
        "task": spec,
        "seq_len": seq_len,
        **result,
        "chance": task.chance_accuracy,
        "context_guess": task.context_guess_accuracy,
        "attnlab": metadata,
    }


def check_perplexity_inputs(loaded: LoadedCheckpoint, path: str | Path, contexts: Sequence[int]) -> None:
    """One-line ValueError for a context length outside 2..max_position_embeddings or a missing or empty
    text file (`heldout` is the corpus's held-out text)."""
    from .tasks import text_file_items

    limit = loaded.model.config.max_position_embeddings
    for context in contexts:
        if not 2 <= context <= limit:
            raise ValueError(f"context length {context} is outside 2..{limit} (the model's max_position_embeddings)")
    if str(path) != "heldout":
        text_file_items(path)


def perplexity_by_context(
    loaded: LoadedCheckpoint, path: str | Path, contexts: Sequence[int], batch_size=8, corpus: str = "builtin"
) -> dict:
    """{context: {word_perplexity, byte_perplexity, bits_per_byte}}: the harness's rolling perplexity of a
    text file (or, for `path="heldout"`, of the corpus's held-out documents: the `heldout` task) with the
    model's window set to each context length (non-overlapping windows, as lm-eval's `wikitext`).
    Contexts above the model's `max_position_embeddings` are refused."""
    check_perplexity_inputs(loaded, path, contexts)
    if str(path) == "heldout":
        task, metadata = "heldout", {"corpus": corpus}
    else:
        task, metadata = PPL_TASK, {"path": str(Path(path).resolve())}
    selection = TaskSelection((task,), (str(TASKS_DIR),), harness_tasks=False)
    manager = checked_task_manager(selection, **metadata)
    table = {}
    for context in contexts:
        output = run_harness(harness_lm(loaded, batch_size, max_length=context), manager, [task], None)
        metrics = output["results"][task]
        table[str(context)] = {
            name: metrics[f"{name},none"] for name in ("word_perplexity", "byte_perplexity", "bits_per_byte")
        }
    return {"data": str(path), "by_context": table}


def load_records(path: str | Path) -> list[dict]:
    """The evaluation records in a results file written by `attnlab eval` (one record or several)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"results file {path} does not exist") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder; give a results file written by attnlab eval --out") from None
    except OSError as error:
        raise ValueError(f"cannot read results file {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"results file {path} is not JSON: {error}") from None
    records = data.get("evaluations", [data]) if isinstance(data, dict) else None
    if not records or not all(isinstance(r, dict) and "attnlab" in r for r in records):
        raise ValueError(f"{path} is not an attnlab results file (written by attnlab eval)")
    return records


def results_json(records: Sequence[dict]) -> str:
    """One record as the harness's structure plus `attnlab`; several as {"evaluations": [...]}."""
    clean = [{key: value for key, value in record.items() if key != "samples"} for record in records]
    data = clean[0] if len(clean) == 1 else {"evaluations": clean}
    return json.dumps(data, indent=2, default=_json_value, allow_nan=True) + "\n"


def write_samples(path: str | Path, records: Sequence[dict]) -> None:
    """The harness's per-sample logs as JSON lines: one line per (checkpoint, task, sample)."""
    from .runconfig import write_text_atomic

    lines = []
    for record in records:
        for task, samples in record.get("samples", {}).items():
            for sample in samples:
                row = {"checkpoint": record["attnlab"]["checkpoint"], "task": task, **sample}
                lines.append(json.dumps(row, default=_json_value))
    write_text_atomic(Path(path), "".join(line + "\n" for line in lines))


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)
