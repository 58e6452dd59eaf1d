"""`attnlab study`: the paper's experiment grid as one resumable command (issue 7).

A study is a list of `Run`s built in code from a base preset (`build_study`). Each run is a sequence of
stages, and every stage is an ordinary `attnlab` command line (`Run.stages`), so `--dry-run` prints
exactly what will be executed and any stage can be re-run by hand:

    train        attnlab train --preset P --layers L … --out DIR/runs/NAME
    eval         attnlab eval  DIR/runs/NAME --tasks offline --out DIR/runs/NAME/study/results.json
    skip         attnlab eval  DIR/runs/NAME --tasks offline --skip-nonstandard --out …/study/skip.json
    recall       attnlab recall DIR/runs/NAME --out …/study/recall.json      (runs trained on a recall task)
    recall-skip  attnlab recall DIR/runs/NAME --skip-nonstandard --out …/study/recall-skip.json

then study-wide `attnlab analyze` runs (`Study.analyses`) and `DIR/report.md` (`attnlab.report`).

Execution (`run_study`): up to `jobs` runs at once, each in a worker process that imports attnlab once and
calls the command's entry point that `attnlab study` hands down (`attnlab.cli.main`, see `CommandRunner`) on
the stage's arguments (the training stage goes through `torchrun` when CUDA devices are present); or each
run as a `submitit` job (`executor="submitit-local"` or `"slurm"`). A finished stage leaves
`runs/NAME/study/stages/<stage>.json` (its seconds and exit status) and is never run again; a killed study
resumes where it stopped: an interrupted training continues from its newest checkpoint. A run folder is
locked (`flock`) while a process works in it, so a study restarted while an orphaned worker still finishes a
run waits for it instead of writing beside it. Every stage's output goes to `runs/NAME/study/log.txt`.
`runs/NAME` itself is the training output folder (model, tokenizer, metrics.jsonl, checkpoints); the study's
own files for the run sit in `runs/NAME/study/` (the whole layout: `attnlab.studyfolder`).

Presets:
    quick             cpu-tiny models of standard and of the six other mixers, uniform and hybrid, skip
                      evaluation of every hybrid; once on the built-in corpus (offline tasks, standard also
                      at a second seed) and once on multi-query associative recall. The README's main job:
                      < 15 minutes on 2 CPU cores.
    placements:MIXER  the nine placements of docs/method.md §7 for one mixer (paper Fig. 3) and a sweep of the share of
                      standard layers, on an 8-layer cpu-tiny model, corpus and recall; the all-standard corpus
                      model also at two more seeds, whose spread sets how close "close to standard" must be.
    paper-70m, paper-160m, paper-500m
                      the paper's grid at full size on SlimPajama with the paper's nine tasks (GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .config import PLACEMENTS, resolve_layer_pattern
from .mixers import BUILTIN_MIXERS, mixer_names
from .options import MODEL_FLAGS, MODEL_SWITCHES, TRAIN_FLAGS, TRAIN_SWITCHES
from .report import write_report
from .runconfig import lock_folder, write_text_atomic
from .studyfolder import STUDY_FILES, run_folder, share_pattern

VARIANTS = tuple(name for name in BUILTIN_MIXERS if name != "standard")  # the paper's six, a study's default
EXECUTORS = ("local", "submitit-local", "slurm")
PAPER_STUDIES = ("paper-70m", "paper-160m", "paper-500m")
# How a stage's `attnlab` command line runs in-process: its arguments in, its exit status out. `attnlab
# study` passes its own entry point (`attnlab.cli.main`); it goes to the worker processes, so it must be
# picklable (a module-level function).
CommandRunner = Callable[[list[str]], int]

# quick: one model per variant on the built-in corpus, about a minute of one core each. cpu-tiny at half width
# with a 512-token BPE: at this budget full cpu-tiny (bpe:4096, 150k tokens) stayed at unigram level for every
# mixer, while this one sees 700k tokens in ~65 s of one core and separates standard from mlp (sweeps:
# held-out loss 3.02 vs 3.64 nats/token at 800k tokens; with AdamW, LR 5e-3 was no better than 3e-3). It keeps beta2
# 0.9999 and fixed windows: beta2 0.95 and shifted windows (tuned for many epochs over a small corpus)
# made this one-epoch run worse: held-out word perplexity of standard 37.0k (seed 1: 36.8k) against 29.2k (33k).
# cpu-tiny's Muon does apply: the standard model's held-out loss 3.003 nats/token against AdamW's 3.106. With
# Muon the peak LR goes up (standard's held-out loss, seed 0): 3e-3 3.003, 5e-3 2.770, 7e-3 2.715, 1e-2 2.697,
# 1.4e-2 2.682, 2e-2 2.690; seed 1: 3e-3 2.930, 7e-3 2.691. 1e-2, the low end of the plateau, for every mixer
# (uniform approximate: 2.877 against 3.228 at 3e-3). At 5e-3, warm-up 100 (2.781), warm-up 300 (2.786)
# and beta2 0.99 (2.800) were worse than warm-up 20 and beta2 0.9999 (2.770).
QUICK_CORPUS_MODEL = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2}
QUICK_CORPUS_TRAIN = {
    "tokenizer": "bpe:512",
    "batch_size": 8,
    "global_batch_size": 8,
    "tokens": 700_000,
    "lr": 1e-2,
    "warmup_steps": 20,
    "beta2": 0.9999,
    "optimizer": "muon",
    "shifted_windows": False,
    "save_every": 200,
    "eval_every": 0,
    "eval_sequences": 32,
    "tensorboard": False,
}
# quick: multi-query associative recall (attnlab.synthetic) on a model that learns it in ~40 s of one core.
# Sized by sweeps: one head (four heads of width 16 stayed at 25 % for 2,400 steps), a vocabulary of 16
# (at 64 the outcome depended on the seed), LR 1e-3 (3e-3 never left 25 %), four layers (a 2-layer hybrid
# keeps one attention layer, and MQAR needs two). AdamW, as swept: cpu-tiny's Muon is untested on this task.
QUICK_RECALL_TASK = "mqar:pairs=4,queries=fill,vocab=16"
QUICK_RECALL_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 1,
    "max_position_embeddings": 32,
    "rope_theta": 10000.0,
}
QUICK_RECALL_TRAIN = {
    "seq_len": 32,
    "batch_size": 32,
    "global_batch_size": 32,
    "max_steps": 800,
    "lr": 1e-3,
    "warmup_steps": 50,
    "beta2": 0.99,
    "optimizer": "adamw",
    "save_every": 400,
    "eval_every": 200,
    "eval_sequences": 256,
    "tensorboard": False,
}
PLACEMENT_LAYERS = 8  # the placements preset deepens cpu-tiny so that the nine placements differ
# The all-standard corpus model again with these seeds (the base run has seed 0): at the quick budget one
# seed's held-out perplexity was ×1.3 another's, so the report widens "close to standard" to the spread of
# these runs when it is larger (`report.close_ppl_limit`). One more run costs quick about 50 s of one core.
QUICK_REPLICATE_SEEDS = (1,)
PLACEMENT_REPLICATE_SEEDS = (1, 2)
PAPER_RECALL_TASK = "mqar:pairs=64,vocab=8192"
PAPER_RECALL_TRAIN = {"seq_len": 512, "batch_size": 64, "global_batch_size": 64, "max_steps": 20_000, "lr": 1e-3}


@dataclass(frozen=True)
class Run:
    """One trained model of a study and the evaluations it gets."""

    name: str  # folder under DIR/runs
    data: str  # "corpus" (language modelling) or "recall" (a synthetic recall task)
    kind: str  # standard | uniform | hybrid | a placement name (docs/method.md §7) | share-<k>of<n>
    mixer: str
    layers: str  # attnlab train --layers
    preset: str
    model: dict[str, Any] = field(default_factory=dict)  # AttnLabConfig overrides (attnlab train flags)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides (attnlab train flags)
    tasks: str | None = None  # eval --tasks for corpus runs
    eval_args: tuple[str, ...] = ()  # further eval/recall flags (--limit, --eval-data, --batch-size …)
    skip: bool = False  # also evaluate with the non-standard layers removed (paper Table 1, "skip")
    replicate: bool = False  # the same model as another run of its kind, with another seed (train["seed"])

    def stages(self, folder: Path) -> list[tuple[str, list[str]]]:
        """[(stage name, attnlab argv)] in execution order; `folder` is this run's training output folder."""
        model, files = str(folder), folder / STUDY_FILES

        def into(name: str) -> list[str]:  # the study's own results files: a retried stage replaces them
            return ["--out", str(files / name), "--overwrite"]

        stages = [("train", ["train", *train_flags(self), "--out", model])]
        if self.data == "corpus":
            evaluate = ["eval", model, "--tasks", self.tasks or "offline", *self.eval_args]
            stages.append(("eval", [*evaluate, *into("results.json")]))
            if self.skip:
                stages.append(("skip", [*evaluate, "--skip-nonstandard", *into("skip.json")]))
        else:
            stages.append(("recall", ["recall", model, *self.eval_args, *into("recall.json")]))
            stages.append(("circuits", ["circuits", model, *self.eval_args, "--out", str(files / "circuits")]))
            if self.skip:
                stages.append(
                    ("recall-skip", ["recall", model, *self.eval_args, "--skip-nonstandard", *into("recall-skip.json")])
                )
        return stages


@dataclass(frozen=True)
class Analysis:
    """One `attnlab analyze` over some corpus runs of the study (figures compare these models)."""

    name: str  # folder under DIR/analysis
    runs: tuple[str, ...]


@dataclass
class Study:
    name: str
    runs: list[Run]
    analyses: list[Analysis] = field(default_factory=list)
    notes: str = ""  # what the preset is for, shown in the report

    def run(self, name: str) -> Run:
        return next(run for run in self.runs if run.name == name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Study:
        runs = [Run(**{**run, "eval_args": tuple(run["eval_args"])}) for run in data["runs"]]
        analyses = [Analysis(item["name"], tuple(item["runs"])) for item in data["analyses"]]
        return cls(data["name"], runs, analyses, data.get("notes", ""))


def train_flags(run: Run) -> list[str]:
    """The `attnlab train` flags of a run (preset, layers, then its overrides), the inverse of the parser."""
    flags = ["--preset", run.preset, "--layers", run.layers]
    switches = {field: flag for flag, field in {**MODEL_SWITCHES, **TRAIN_SWITCHES}.items()}
    valued = {field: flag for flag, (field, *_) in {**MODEL_FLAGS, **TRAIN_FLAGS}.items()}
    for name, value in [*run.model.items(), *run.train.items()]:
        if name in switches:
            flags.append(switches[name] if value else "--no-" + switches[name][2:])
        elif name in valued:
            flags += [valued[name], json.dumps(value) if isinstance(value, dict) else str(value)]
        else:
            raise ValueError(f"run {run.name}: {name} has no attnlab train flag")
    return flags


# --- presets -----------------------------------------------------------------------------------------


def _run_name(data: str, kind: str, mixer: str) -> str:
    return f"{data}-{kind}" if kind == "standard" else f"{data}-{kind}-{mixer}"


def _grid(
    data: str, preset: str, mixers: Sequence[str], model: dict, train: dict, tasks: str | None, eval_args
) -> list[Run]:
    """standard, then uniform and hybrid (with skip) of every mixer: the rows of paper Table 1."""
    common = {"preset": preset, "model": model, "train": train, "tasks": tasks, "eval_args": tuple(eval_args)}
    runs = [Run(_run_name(data, "standard", "standard"), data, "standard", "standard", "uniform:standard", **common)]
    for kind in ("uniform", "hybrid"):
        for mixer in mixers:
            runs.append(
                Run(_run_name(data, kind, mixer), data, kind, mixer, f"{kind}:{mixer}", skip=kind == "hybrid", **common)
            )
    return runs


def _variants(names: Sequence[str]) -> tuple[str, ...]:
    """The variants a study trains beside standard (always trained): registered mixers, standard dropped."""
    registered = mixer_names()
    unknown = [name for name in names if name not in registered]
    if unknown:
        raise ValueError(f"unknown mixer(s) {unknown} in --mixers; registered mixers: {', '.join(registered)}")
    variants = tuple(dict.fromkeys(name for name in names if name != "standard"))
    if not variants:
        raise ValueError("--mixers needs at least one mixer besides standard (standard is always trained)")
    return variants


def build_study(
    preset: str = "quick",
    mixers: Sequence[str] | None = None,
    tokens: int | None = None,
    max_steps: int | None = None,
    eval_limit: float | None = None,
    eval_data: str | None = None,
    device: str | None = None,
) -> Study:
    """The runs of a study preset. `mixers` restricts the variants; `tokens`/`max_steps` override the
    training budget of every run (`max_steps` wins); `eval_limit` caps the examples per evaluation task;
    `eval_data` reads the paper's tasks from local copies (`attnlab eval --eval-data`)."""
    mixers = _variants(mixers) if mixers else VARIANTS
    budget = {"max_steps": max_steps} if max_steps else {"tokens": tokens, "max_steps": None} if tokens else {}
    execution = {"device": device} if device else {}
    eval_args = ["--limit", str(eval_limit)] if eval_limit is not None else []
    recall_args = ["--num-examples", str(_recall_examples(eval_limit))] if eval_limit is not None else []

    if preset == "quick" or preset.startswith("placements:"):
        corpus_train = {**QUICK_CORPUS_TRAIN, **budget, **execution}
        recall_train = {**QUICK_RECALL_TRAIN, **({"max_steps": max_steps} if max_steps else {}), **execution}
        recall_train["data"] = QUICK_RECALL_TASK
        if preset == "quick":
            runs = _grid("corpus", "cpu-tiny", mixers, QUICK_CORPUS_MODEL, corpus_train, "offline", eval_args)
            runs = _with_replicates(runs, QUICK_REPLICATE_SEEDS)
            runs += _grid("recall", "cpu-tiny", mixers, QUICK_RECALL_MODEL, recall_train, None, recall_args)
            return _table_study(
                "quick", runs, "small cpu-tiny models, built-in corpus and multi-query associative recall"
            )
        return _placement_study(preset, corpus_train, recall_train, eval_args, recall_args)

    if preset in PAPER_STUDIES:
        if eval_data:
            eval_args += ["--eval-data", eval_data]
        train = {**budget, **execution}
        runs = _grid("corpus", preset, mixers, {}, train, "paper", eval_args)
        recall = {**PAPER_RECALL_TRAIN, **({"max_steps": max_steps} if max_steps else {}), **execution}
        runs += _grid("recall", preset, mixers, {}, {**recall, "data": PAPER_RECALL_TASK}, None, recall_args)
        notes = f"the paper's grid at {preset[6:].upper()} (SlimPajama, Pythia tokenizer, the nine paper tasks)"
        return _table_study(preset, runs, notes)
    raise ValueError(f"unknown study preset {preset!r}; choose quick, placements:<mixer>, {', '.join(PAPER_STUDIES)}")


def _table_study(name: str, runs: list[Run], notes: str) -> Study:
    """A Table-1 grid with two analyses of its corpus runs: standard beside the uniform and the hybrid models."""
    corpus = [run for run in runs if run.data == "corpus" and not run.replicate]
    analyses = [
        Analysis(kind, tuple(run.name for run in corpus if run.kind in ("standard", kind)))
        for kind in ("uniform", "hybrid")
    ]
    return Study(name, runs, analyses, notes)


def _with_replicates(runs: list[Run], seeds: Sequence[int]) -> list[Run]:
    """`runs` with the corpus standard run repeated right after it at each of `seeds` (`Run.replicate`)."""
    index = next(i for i, run in enumerate(runs) if run.data == "corpus" and run.kind == "standard")
    standard = runs[index]
    replicates = [
        dataclasses.replace(
            standard, name=f"{standard.name}-seed{seed}", train={**standard.train, "seed": seed}, replicate=True
        )
        for seed in seeds
    ]
    return runs[: index + 1] + replicates + runs[index + 1 :]


def _recall_examples(eval_limit: float) -> int:
    """`--eval-limit` for `attnlab recall`: a count as it is, a fraction of the default 512 examples."""
    return max(2, int(eval_limit) if eval_limit >= 1 else round(512 * eval_limit))


def _placement_study(
    preset: str, corpus_train: dict, recall_train: dict, eval_args: list[str], recall_args: list[str]
) -> Study:
    """Spec §7's nine placements of one mixer plus the share sweep (0..n standard layers), both data kinds.

    A share whose evenly spread layers coincide with a placement (at 8 layers: 1 = last, 2 = quarter,
    4 = even) is not trained twice: the report finds it among the placements by its layer list.
    """
    mixer = preset.split(":", 1)[1]
    if mixer == "standard":
        raise ValueError("placements:<mixer> needs a mixer other than standard (e.g. placements:mlp)")
    _variants([mixer])
    depth = PLACEMENT_LAYERS
    patterns = {"standard": "uniform:standard", "uniform": f"uniform:{mixer}"}
    patterns.update({name: f"{name}:{mixer}" for name in PLACEMENTS if name != "hybrid"})
    trained = {tuple(resolve_layer_pattern(layers, depth)) for layers in patterns.values()}
    for share in range(1, depth):
        layers = share_pattern(mixer, share, depth)
        if tuple(layers.split(",")) not in trained:
            patterns[f"share-{share}of{depth}"] = layers
    runs = []
    for data, train, model in (
        ("corpus", corpus_train, {**QUICK_CORPUS_MODEL, "num_hidden_layers": depth}),
        ("recall", recall_train, {**QUICK_RECALL_MODEL, "num_hidden_layers": depth}),
    ):
        for kind, layers in patterns.items():
            tasks, args = ("offline", eval_args) if data == "corpus" else (None, recall_args)
            name = _run_name(data, kind, mixer)
            runs.append(Run(name, data, kind, mixer, layers, "cpu-tiny", model, train, tasks, tuple(args)))
    runs = _with_replicates(runs, PLACEMENT_REPLICATE_SEEDS)
    corpus_runs = tuple(run.name for run in runs if run.data == "corpus" and not run.replicate)
    notes = f"where standard layers must sit, and how many, to rescue {mixer} ({depth}-layer cpu-tiny)"
    return Study(preset, runs, [Analysis("placements", corpus_runs)], notes)


# --- execution ---------------------------------------------------------------------------------------


def stage_record(out: Path, run: Run, stage: str) -> dict | None:
    path = run_folder(out, run.name) / STUDY_FILES / "stages" / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def format_command(argv: Sequence[str], launcher: Sequence[str] = ("attnlab",)) -> str:
    return shlex.join([*launcher, *argv])


def dry_run_text(study: Study, out: Path) -> str:
    lines = [f"study {study.name}: {len(study.runs)} runs, {len(study.analyses)} analyses → {out}"]
    saved = load_study(out) if (out / "study.json").is_file() else None
    for run in study.runs:
        stages = run.stages(run_folder(out, run.name))
        same = saved is None or run in saved.runs  # a changed run's folder holds another run's results
        state = "done" if same and stage_record(out, run, stages[-1][0]) else "to do"
        lines.append(f"\n# {run.name}  [{run.data}, {run.layers}]  ({state})")
        lines += [format_command(argv) for _, argv in stages]
    for analysis in study.analyses:
        lines.append(f"\n# analysis {analysis.name}")
        lines.append(format_command(analysis_argv(out, analysis)))
    return "\n".join(lines)


def analysis_argv(out: Path, analysis: Analysis) -> list[str]:
    models = [str(run_folder(out, name)) for name in analysis.runs]
    return ["analyze", *models, "--out", str(out / "analysis" / analysis.name)]


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (released by the kernel if this process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@contextlib.contextmanager
def _output_to(log: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (Python and C level) to `log` for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _use_threads(threads: int | None) -> None:
    """Give this worker process `threads` torch intra-op threads (None: leave torch's setting)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _torchrun_prefix() -> list[str]:
    """`torchrun` over this node's CUDA devices, or [] on a machine without them (run in-process)."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={count}"]


def _execute(argv: list[str], log: Path, subprocess_prefix: list[str], run_command: CommandRunner) -> int:
    """Run one attnlab command line: through `run_command` in this process, or under `subprocess_prefix`
    (torchrun)."""
    with open(log, "a") as handle:
        handle.write(f"\n$ {format_command(argv)}\n")
        if subprocess_prefix:
            handle.flush()
            command = [*subprocess_prefix, "-m", "attnlab", *argv]
            return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, check=False).returncode
    with _output_to(log):
        try:
            return run_command(argv)
        except SystemExit as stop:  # argparse errors
            return stop.code if isinstance(stop.code, int) else 2
        except Exception:  # noqa: BLE001 — a bug must not take the whole study down: log it, fail the stage
            import traceback

            traceback.print_exc()
            return 1


def _prepare_training(folder: Path, argv: list[str]) -> list[str]:
    """Continue an interrupted training from its newest checkpoint, or restart one that saved none (its
    partial files go; the study's own files stay)."""
    from .checkpoint import latest_checkpoint

    if latest_checkpoint(folder) is not None:
        return [*argv, "--resume"]
    for path in folder.iterdir():
        if path.name != STUDY_FILES:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return argv


def execute_run(out: str, name: str, run_command: CommandRunner, threads: int | None = None) -> dict:
    """Every unfinished stage of run `name` of the study in `out` (a worker's or a submitit job's task),
    each through `run_command` (the training stage under torchrun when CUDA devices are present).

    Returns {"name", "stages": {stage: record}, "failed": what failed or None, "log": the log file}.
    """
    from .train import EXIT_DIVERGED

    out_path = Path(out)
    study = load_study(out_path)
    run = study.run(name)
    folder = run_folder(out_path, name)  # the training output folder, which every later stage reads
    _use_threads(threads)
    files = folder / STUDY_FILES
    summary: dict[str, Any] = {"name": name, "stages": {}, "failed": None, "log": str(files / "log.txt")}
    with _locked(files):
        (files / "stages").mkdir(exist_ok=True)
        diverged = False
        for stage, argv in run.stages(folder):
            record = stage_record(out_path, run, stage)
            if record is None:
                prefix: list[str] = []
                if stage == "train":
                    argv = _prepare_training(folder, argv)
                    prefix = _torchrun_prefix()
                elif diverged:
                    argv = _evaluate_checkpoint_instead(argv, folder)
                    if argv is None:
                        summary["stages"][stage] = {"status": "no model", "seconds": 0.0}
                        continue
                started = time.perf_counter()
                code = _execute(argv, files / "log.txt", prefix, run_command)
                record = {"status": "done", "exit": code, "seconds": time.perf_counter() - started, "argv": argv}
                if stage == "train" and code == EXIT_DIVERGED:
                    record["status"] = "diverged"
                elif code != 0:
                    summary["stages"][stage] = {**record, "status": "failed"}
                    summary["failed"] = f"{stage}: exit status {code}"
                    return summary  # not recorded: a resumed study tries it again
                write_text_atomic(files / "stages" / f"{stage}.json", json.dumps(record, indent=1) + "\n")
            else:
                record = {**record, "reused": True}
            diverged = diverged or record["status"] == "diverged"
            summary["stages"][stage] = record
    return summary


def _evaluate_checkpoint_instead(argv: list[str], folder: Path) -> list[str] | None:
    """After a diverged training (no final model in `folder`), evaluate its newest finite checkpoint, if any."""
    from .checkpoint import latest_checkpoint

    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        return None
    return [str(checkpoint) if part == str(folder) else part for part in argv]


def execute_analysis(out: str, name: str, run_command: CommandRunner, threads: int | None = None) -> dict:
    out_path = Path(out)
    study = load_study(out_path)
    analysis = next(item for item in study.analyses if item.name == name)
    folder = out_path / "analysis" / name
    marker, log = folder / "done.json", folder / "log.txt"
    if marker.is_file():
        return {"name": name, "failed": None, "log": str(log), "reused": True}
    _use_threads(threads)
    available = [run for run in analysis.runs if (run_folder(out_path, run) / "config.json").is_file()]
    if not available:
        return {"name": name, "failed": "no trained model", "log": str(log)}
    argv = analysis_argv(out_path, dataclasses.replace(analysis, runs=tuple(available)))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    code = _execute(argv, log, [], run_command)
    if code != 0:
        return {"name": name, "failed": f"exit status {code}", "log": str(log)}
    write_text_atomic(marker, json.dumps({"seconds": time.perf_counter() - started, "argv": argv}) + "\n")
    return {"name": name, "failed": None, "log": str(log)}


def load_study(out: Path) -> Study:
    path = out / "study.json"
    if not path.is_file():
        raise ValueError(f"{out} holds no study (no study.json); start one with attnlab study --out {out}")
    return Study.from_dict(json.loads(path.read_text()))


def _claim_folder(out: Path, study: Study, resume: bool) -> IO[str]:
    """Lock `out` for this study process (the returned file holds the lock until closed), then write
    study.json, or check that the one in `out` describes the same study when resuming."""
    path = out / "study.json"
    if not path.is_file() and out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no study; choose an empty or new --out")
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_folder(out)
    try:
        if not path.is_file():
            write_text_atomic(path, json.dumps(study.to_dict(), indent=1) + "\n")
            return lock
        if not resume:
            raise ValueError(f"{out} already holds a study; add --resume to continue it, or choose another --out")
        saved = load_study(out)
        changed = [run.name for run in study.runs if run not in saved.runs]
        if changed or saved.name != study.name:
            raise ValueError(
                f"--resume: {out} holds study {saved.name!r} whose runs differ from this one "
                f"({', '.join(changed[:3]) or 'names'}); use the same preset and options, or another --out"
            )
        return lock
    except BaseException:
        lock.close()
        raise


def _check_machine(study: Study, executor: str) -> None:
    """Refuse, before anything is written, a study this machine cannot run: Slurm jobs without Slurm, CUDA
    runs without a CUDA device."""
    if executor == "slurm":
        missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]
        if missing:
            raise ValueError(
                f"--executor slurm needs Slurm's {' and '.join(missing)} on PATH (run it on the cluster's login "
                "node), or use --executor local"
            )
    devices = {run.train.get("device") for run in study.runs}
    if any(str(device).startswith("cuda") for device in devices) and executor != "slurm":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: this machine has no usable CUDA device; use --device cpu or auto")


def run_study(
    study: Study,
    out: str | Path,
    run_command: CommandRunner,
    jobs: int = 1,
    resume: bool = False,
    executor: str = "local",
    slurm: dict | None = None,
    progress: bool = True,
) -> dict:
    """Execute every unfinished run of `study` into `out`, then its analyses and the report. Each stage is
    an `attnlab` command line that `run_command` runs (`attnlab.cli.main`; see `CommandRunner`).

    Returns {"failed": [run or analysis names], "report": path or None}. Raises ValueError for bad input,
    and when another study process holds `out`.
    """
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; choose {', '.join(EXECUTORS)}")
    _check_machine(study, executor)
    out = Path(out).resolve()
    with _claim_folder(out, study, resume):  # held until the report is written
        return _run_claimed_study(study, out, run_command, jobs, executor, slurm, progress)


def _run_claimed_study(
    study: Study, out: Path, run_command: CommandRunner, jobs: int, executor: str, slurm: dict | None, progress: bool
) -> dict:
    from tqdm.auto import tqdm

    threads = max(1, (os.cpu_count() or 1) // jobs)
    tasks = [(execute_run, run.name) for run in study.runs]
    failed: list[str] = []
    bar = tqdm(total=len(tasks) + len(study.analyses), desc=f"study {study.name}", unit="run", disable=not progress)
    try:
        for batch in (tasks, [(execute_analysis, analysis.name) for analysis in study.analyses]):
            for result in _map(batch, str(out), run_command, jobs, threads, executor, slurm or {}, out / "submitit"):
                name = result["name"]
                if result["failed"]:
                    failed.append(name)
                    bar.write(f"attnlab: {name} failed ({result['failed']}); see {result['log']}")
                else:
                    stages = result.get("stages", {})
                    timing = ", ".join(
                        f"{stage} " + ("reused" if record.get("reused") else f"{record['seconds']:.0f} s")
                        for stage, record in stages.items()
                    )
                    bar.write(f"{name}: {timing or 'done'}")
                bar.update(1)
    finally:  # before any error message: a bar drawn after it would hide it
        bar.close()
    report = write_report(out, study)
    return {"failed": failed, "report": str(report)}


def _worker_setup(parent_pid: int) -> None:
    """In each local pool worker: leave Ctrl-C to the study process (which stops the workers itself) and,
    on Linux, die with it, so that a study killed by SIGKILL or SIGTERM leaves no worker behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the study process died before the line above took effect
        os._exit(1)


def _map(
    tasks, out: str, run_command: CommandRunner, jobs: int, threads: int, executor: str, slurm: dict, logs: Path
) -> Iterator[dict]:
    """Results of `function(out, name, run_command, threads)` for each task, as they finish, at most `jobs` at a
    time."""
    if executor == "local":
        import multiprocessing

        pool = ProcessPoolExecutor(
            max_workers=jobs,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_setup,
            initargs=(os.getpid(),),
        )
        try:
            pending: set[Future] = set()
            queue = list(tasks)
            while queue or pending:
                while queue and len(pending) < jobs:
                    function, name = queue.pop(0)
                    pending.add(pool.submit(function, out, name, run_command, threads))
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        except BaseException:  # Ctrl-C, or an error here: stop the stages in flight (--resume redoes them)
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.kill()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
        return
    yield from _map_submitit(tasks, out, run_command, jobs, threads, executor, slurm, logs)


def _map_submitit(
    tasks, out: str, run_command: CommandRunner, jobs: int, threads: int, executor: str, slurm: dict, logs: Path
):
    """The same through submitit: a LocalExecutor (subprocesses on this machine) or Slurm jobs."""
    import submitit

    if executor == "slurm":
        runner = submitit.AutoExecutor(folder=logs, cluster="slurm")
        runner.update_parameters(
            slurm_partition=slurm.get("partition"),
            timeout_min=slurm.get("timeout_min", 24 * 60),
            gpus_per_node=slurm.get("gpus_per_node", 1),
            tasks_per_node=1,
            cpus_per_task=slurm.get("cpus_per_task", 8),
            name="attnlab",
        )
        threads = slurm.get("cpus_per_task", 8)
    else:
        runner = submitit.LocalExecutor(folder=logs)
        runner.update_parameters(timeout_min=24 * 60)
    queue = list(tasks)
    pending: list = []
    while queue or pending:
        while queue and len(pending) < jobs:
            function, name = queue.pop(0)
            pending.append((name, runner.submit(function, out, name, run_command, threads)))
        while not any(job.done() for _, job in pending):
            time.sleep(1.0)
        for name, job in [item for item in pending if item[1].done()]:
            pending.remove((name, job))
            try:
                yield job.result()
            except Exception as error:  # noqa: BLE001 — the job died (killed, out of memory, …)
                first_line = (str(error).strip().splitlines() or ["no message"])[-1]
                yield {"name": name, "failed": f"submitit job {job.job_id}: {first_line}", "log": str(job.paths.stderr)}
