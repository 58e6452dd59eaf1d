"""The `attnlab` command: thin subcommands that parse arguments and call library code.

Bad input ends with one line on stderr (`attnlab: error: …`) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path

from . import __version__, presets
from .options import MODEL_FLAGS, MODEL_SWITCHES, TRAIN_FLAGS, TRAIN_SWITCHES, json_object


class _Parser(argparse.ArgumentParser):
    """Bad flags end with one line and exit status 2 (no usage dump)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model architecture (override the preset)")
    for flag, (field, kind) in MODEL_FLAGS.items():
        group.add_argument(flag, dest=field, type=kind, default=None, metavar="JSON" if kind is json_object else "N")
    for flag, field in MODEL_SWITCHES.items():
        group.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None)


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """The checkpoints a command reads, and the device it runs them on."""
    parser.add_argument("checkpoints", nargs="+", metavar="CKPT", help="training output folder or checkpoint-<step>")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")


def model_overrides(args: argparse.Namespace) -> dict:
    fields = [field for field, _ in MODEL_FLAGS.values()] + list(MODEL_SWITCHES.values())
    return {field: getattr(args, field) for field in fields if getattr(args, field) is not None}


def command_env(args: argparse.Namespace) -> int:
    from .environment import LOCK_FILE_NAME, default_lock_path, lock_differences, package_versions, read_lock

    record = package_versions()
    lock_path = Path(args.lock) if args.lock else default_lock_path()
    lock = read_lock(lock_path) if lock_path is not None else None
    width = max(len(name) for name in record)
    for name, version in record.items():
        locked = (lock or {}).get(name)
        note = "" if locked is None else f"  (lock {locked})"
        print(f"{name:<{width}}  {version or 'not installed'}{note}")
    if lock is None:
        print(f"lock: none found (no {LOCK_FILE_NAME}: attnlab is not installed from its source tree; pass --lock)")
        return 1 if args.check else 0
    differences = lock_differences(lock)
    if not differences:
        print(f"lock: {lock_path}: all {len(lock)} pinned packages that are installed match")
        return 0
    listed = ", ".join(str(difference) for difference in differences)
    print(f"lock: {lock_path}: {len(differences)} installed package(s) differ: {listed}")
    return 1 if args.check else 0


def command_params(args: argparse.Namespace) -> int:
    from .params import format_table, variant_counts

    overrides = model_overrides(args)
    if args.preset:
        names = args.preset
    elif overrides:
        names = ["cpu-tiny"]
    else:
        names = [*presets.PAPER_PRESETS, "cpu-tiny"]
    report = []
    for name in names:
        options = {**presets.model_options(name), **overrides}
        title = name if not overrides else f"{name} with {', '.join(f'{k}={v}' for k, v in overrides.items())}"
        try:
            counts = variant_counts(options)
        except (RuntimeError, OverflowError) as error:  # sizes whose tensors cannot even be described
            raise ValueError(f"{title}: cannot build this model ({str(error).splitlines()[0]})") from None
        report.append((title, counts))
    if args.format == "json":
        print(json.dumps({title: [asdict(count) for count in counts] for title, counts in report}, indent=2))
    else:
        print("\n\n".join(format_table(title, counts) for title, counts in report))
    return 0


def command_train(args: argparse.Namespace) -> int:
    from .runconfig import resolve_run_config
    from .train import EXIT_DIVERGED, TrainingDiverged, train

    train_overrides = {
        field: getattr(args, field) for field, _, _ in TRAIN_FLAGS.values() if getattr(args, field) is not None
    }
    train_overrides.update({f: getattr(args, f) for f in TRAIN_SWITCHES.values() if getattr(args, f) is not None})
    model_options = model_overrides(args)
    if args.layers is not None:
        model_options["layers"] = args.layers
    run = resolve_run_config(args.preset, args.config, model_options, train_overrides)
    out = args.out or f"runs/{args.preset}-{(args.layers or 'standard').replace(':', '-').replace(',', '-')}"
    try:
        train(run, out, resume=args.resume, overwrite=args.overwrite)
    except TrainingDiverged as error:
        print(f"attnlab: error: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
        print(f"attnlab: the trained model, its metrics and checkpoints are in {out}", file=sys.stderr)
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _limit(text: str) -> int | float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return int(value) if value >= 1 and value.is_integer() else value


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _batch_size(text: str) -> int | str:
    """A positive integer, `auto` (the harness finds the largest batch that fits) or `auto:N` (and looks
    again N times)."""
    if text == "auto":
        return text
    if text.startswith("auto:"):
        _positive_int(text.removeprefix("auto:"))
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, auto or auto:N, got {text!r}") from None


def command_eval(args: argparse.Namespace) -> int:
    from .evaluation import check_checkpoint, evaluate_checkpoint, resolve_tasks, results_json, write_samples
    from .runconfig import lock_output_file, write_text_atomic
    from .table import markdown_table, ppl_context_table
    from .train import pick_device

    tasks = args.tasks if args.tasks is not None else ("none" if args.ppl_contexts else "offline")
    selection = (
        None
        if tasks == "none"
        else resolve_tasks(tasks, eval_data=args.eval_data, allow_task_code=args.allow_task_code)
    )
    if selection is None and not args.ppl_contexts:
        raise ValueError("--tasks none leaves nothing to do; give tasks or --ppl-contexts")
    if args.ppl_contexts and not args.ppl_data:
        raise ValueError("--ppl-contexts needs --ppl-data FILE (a text file to measure perplexity on)")
    device = str(pick_device(args.device))
    out = output_file(args.out, overwrite=args.overwrite)
    if args.samples:
        output_file(args.samples, "--samples", overwrite=args.overwrite)
    for checkpoint in args.checkpoints:  # all of them before the first evaluation starts
        check_checkpoint(Path(checkpoint))
    records = []
    with lock_output_file(out):  # one writer of this results file
        for checkpoint in args.checkpoints:
            records.append(
                evaluate_checkpoint(
                    checkpoint,
                    selection,
                    limit=args.limit,
                    batch_size=args.batch_size,
                    device=device,
                    dtype=args.dtype,
                    skip_nonstandard=args.skip_nonstandard,
                    ppl_contexts=args.ppl_contexts or (),
                    ppl_data=args.ppl_data,
                    corpus=args.corpus,
                    max_length=args.max_length,
                    log_samples=args.samples is not None,
                )
            )
            write_text_atomic(out, results_json(records))  # after every checkpoint: finished work is kept
            if args.samples:
                write_samples(args.samples, records)
    if args.table:
        print(markdown_table(records) + ("\n" + ppl_context_table(records) if args.ppl_contexts else ""))
    print(f"attnlab: results of {len(records)} checkpoint(s) are in {out}", file=sys.stderr)
    return 0


def output_file(text: str, flag: str = "--out", overwrite: bool = False) -> Path:
    """An output file path, refused at once (before any work) unless it can be written: not a folder, not an
    existing file (unless `overwrite`), in a folder that exists and takes new files (the atomic write puts a
    temporary file beside it)."""
    from .runconfig import cannot_create_in

    out = Path(text)
    if out.is_dir():
        raise ValueError(f"{flag} {out} is a folder; give a file path such as {out / 'results.json'}")
    if out.exists() and not overwrite:
        raise ValueError(f"{flag} {out} exists; pass --overwrite to replace it, or give another path")
    if not out.parent.is_dir():
        raise ValueError(f"{flag} {out}: folder {out.parent} does not exist")
    reason = cannot_create_in(out.parent)
    if reason:
        raise ValueError(f"{flag} {out}: cannot write in {out.parent} ({reason})")
    return out


def command_table(args: argparse.Namespace) -> int:
    from .runconfig import write_text_atomic
    from .table import csv_table, load_table_records, markdown_table, ppl_context_table

    if args.out:  # PREFIX.md and PREFIX.csv: the suffixes are added, whatever dots PREFIX holds
        output_file(f"{args.out}.md", overwrite=args.overwrite)
        output_file(f"{args.out}.csv", overwrite=args.overwrite)
    records = load_table_records(args.results)
    contexts = ppl_context_table(records)
    main_table = markdown_table(records)
    context_part = "Word perplexity by context length:\n\n" + contexts if contexts else ""
    markdown = main_table + ("\n" if main_table and context_part else "") + context_part
    print(markdown, end="")
    if args.out:
        write_text_atomic(Path(f"{args.out}.md"), markdown)
        write_text_atomic(Path(f"{args.out}.csv"), csv_table(records))
        print(f"attnlab: wrote {args.out}.md and {args.out}.csv", file=sys.stderr)
    return 0


def command_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze_models
    from .train import pick_device

    summary = analyze_models(
        args.checkpoints,
        args.out,
        data=args.data,
        num_seqs=args.num_seqs,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        device=str(pick_device(args.device)),
        metrics_files=args.metrics,
        heatmap_model=args.heatmap_model,
    )
    print(
        f"attnlab: indicators in {summary['indicators_path']}; {len(summary['figures'])} figure files in {args.out}",
        file=sys.stderr,
    )
    return 0


def command_circuits(args: argparse.Namespace) -> int:
    from .circuits import run_circuits
    from .train import pick_device

    device = str(pick_device(args.device))
    summary = run_circuits(
        args.checkpoints, args.out, args.task, args.num_examples, args.mode, args.block, device, args.data
    )
    for label, entry in summary["models"].items():
        baseline = entry["ablation"]["baseline"]
        line = f"attnlab: {label}: {entry['task']}: accuracy {100 * baseline['accuracy']:.1f} %"
        if entry["icl_score"] is not None:
            line += f", loss {baseline['loss']:.3f}, in-context-learning score {entry['icl_score']:+.3f} nats"
        print(line, file=sys.stderr)
    print(f"attnlab: scores and ablations in {summary['circuits_path']}, figures in {args.out}", file=sys.stderr)
    return 0


def command_recall(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_recall
    from .runconfig import lock_output_file, write_text_atomic
    from .train import pick_device

    if len(args.checkpoints) != 1:
        raise ValueError("attnlab recall takes one checkpoint")
    out = output_file(args.out, overwrite=args.overwrite)
    with lock_output_file(out):  # one writer of this results file
        record = evaluate_recall(
            args.checkpoints[0],
            args.task,
            num_examples=args.num_examples,
            batch_size=args.batch_size,
            device=str(pick_device(args.device)),
            skip_nonstandard=args.skip_nonstandard,
        )
        if not math.isfinite(record["stderr"]):  # one example has no standard error; JSON has no NaN
            record["stderr"] = None
        write_text_atomic(out, json.dumps(record, indent=1) + "\n")
    spread = "n/a" if record["stderr"] is None else f"{100 * record['stderr']:.1f}"
    print(
        f"attnlab: {record['task']}: accuracy {100 * record['accuracy']:.1f} ± {spread} % "
        f"(chance {100 * record['chance']:.1f} %) over {record['examples']} examples; written to {args.out}",
        file=sys.stderr,
    )
    return 0


def command_study(args: argparse.Namespace) -> int:
    from .study import build_study, dry_run_text, run_study

    study = build_study(
        args.preset,
        mixers=_name_list(args.mixers) if args.mixers else None,
        tokens=args.tokens,
        max_steps=args.max_steps,
        eval_limit=args.eval_limit,
        eval_data=args.eval_data,
        device=args.device,
    )
    out = Path(args.out or f"studies/{args.preset.replace(':', '-')}").resolve()
    if args.dry_run:
        print(dry_run_text(study, out))
        return 0
    slurm = {"partition": args.slurm_partition, "gpus_per_node": args.slurm_gpus, "timeout_min": args.slurm_time}
    result = run_study(
        study, out, run_command=main, jobs=args.jobs, resume=args.resume, executor=args.executor, slurm=slurm
    )
    print(f"attnlab: report in {result['report']}", file=sys.stderr)
    if result["failed"]:
        print(
            f"attnlab: error: {len(result['failed'])} part(s) failed: {', '.join(result['failed'])}; "
            f"fix the cause (see their log.txt) and rerun with --resume",
            file=sys.stderr,
        )
        return 1
    return 0


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def command_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSettings, run_bench

    settings = BenchSettings(
        preset=args.preset,
        model_overrides=model_overrides(args),
        **{name: getattr(args, name) for name in BENCH_OPTIONS if getattr(args, name) is not None},
        against_hf=args.against_hf,
        bf16=args.bf16,
    )
    results = run_bench(settings, args.out)
    print(f"attnlab: benchmark results in {args.out}: {', '.join(results['files'])}", file=sys.stderr)
    return 0


# `attnlab bench` options: field of BenchSettings → (type, help); each is the flag --field-name.
BENCH_OPTIONS = {
    "mixers": (lambda text: tuple(_name_list(text)), "comma-separated mixers (default: every registered mixer)"),
    "contexts": (
        lambda text: tuple(_int_list(text)),
        "context lengths for prefill/decode/cache (default 128,256,512,1024)",
    ),
    "sections": (lambda text: tuple(_name_list(text)), "comma-separated subset of train,prefill,decode,cache"),
    "threads": (int, "torch intra-op threads (default: torch's)"),
    "repeats": (int, "timed runs per measurement (train: turns per model; default 3)"),
    "warmup": (int, "untimed runs (train: steps) first (default 1)"),
    "train_seq_len": (
        lambda text: tuple(_int_list(text)),
        "comma-separated training lengths L, e.g. 512,2048,8192 (default 128,1024)",
    ),
    "train_tokens_per_step": (int, "training tokens per step B·L: B = this // L, at least 1 (default 16384)"),
    "train_batch_size": (int, "training sequences per step at every L; set, it wins over --train-tokens-per-step"),
    "train_steps": (int, "timed training steps per turn (default 2)"),
    "decode_batch_size": (int, "sequences in the prefill/decode runs (default 8)"),
    "decode_tokens": (int, "cached single-token steps timed per run (default 16)"),
    "device": (str, "auto | cpu | cuda | cuda:N"),
    "seed": (int, "seed of weights and tokens (default 0)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="attnlab", description="Which parts of attention matter? (Deconstructing Attention, arXiv 2510.11602)"
    )
    parser.add_argument("--version", action="version", version=f"attnlab {__version__}")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    env = subcommands.add_parser(
        "env",
        help="versions of attnlab, torch, transformers, lm-eval, datasets, tokenizers; do they match the lock?",
        description="Print the versions that attnlab records in every result, and compare every installed "
        "package pinned in the lock (requirements.lock of attnlab's source tree) with its pin.",
    )
    env.add_argument("--lock", metavar="FILE", help="the lock to compare with (default: the source tree's)")
    env.add_argument("--check", action="store_true", help="exit 1 when a package differs from the lock")
    env.set_defaults(handler=command_env)
    params = subcommands.add_parser(
        "params",
        help="parameter counts of every registered mixer, uniform and hybrid",
        description="Parameter counts of every registered mixer, uniform and hybrid, on the meta device (no memory). "
        "With no preset and no flags: every paper preset and cpu-tiny.",
    )
    params.add_argument(
        "--preset", action="append", choices=presets.preset_names(), help="preset to count (repeatable)"
    )
    params.add_argument("--format", choices=("markdown", "json"), default="markdown")
    add_model_arguments(params)
    params.set_defaults(handler=command_params)

    train = subcommands.add_parser(
        "train",
        help="pretrain a model (one process, or one per device under torchrun)",
        description="Pretrain an attnlab model: preset YAML, then --config, then flags. "
        "Writes checkpoints, metrics.jsonl, TensorBoard logs and the final model to --out.",
    )
    train.add_argument("--preset", default="cpu-tiny", choices=presets.preset_names())
    train.add_argument("--config", help="YAML file with model: and/or train: sections (overrides the preset)")
    train.add_argument(
        "--layers", help="layer pattern: uniform:<mixer>, hybrid:<mixer>, <placement>:<mixer>, or a list"
    )
    train.add_argument("--out", help="output folder (default: runs/<preset>-<layers>)")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="train in an --out that holds other files or another run: attnlab's own files there are replaced",
    )
    for flag, (field, kind, help_text) in TRAIN_FLAGS.items():
        train.add_argument(flag, dest=field, type=kind, default=None, help=help_text)
    for flag, field in TRAIN_SWITCHES.items():
        train.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None)
    add_model_arguments(train)
    train.set_defaults(handler=command_train)

    evaluate = subcommands.add_parser(
        "eval",
        help="evaluate checkpoints with lm-evaluation-harness (paper Table 1), and perplexity vs context",
        description="Zero-shot evaluation of attnlab checkpoints through lm-evaluation-harness. Task lists: paper "
        "(arc_easy, boolq, copa, piqa, sciq, rte, hellaswag, wikitext, lambada_openai; needs their datasets), "
        "offline (lastword, cloze, heldout: built from held-out text, no network), harness task names, and "
        "paths to task YAML files.",
    )
    add_checkpoint_arguments(evaluate)
    evaluate.add_argument(
        "--tasks",
        help="comma-separated tasks/lists/YAML paths, or none (default: offline; none with --ppl-contexts)",
    )
    evaluate.add_argument("--out", default="results.json", help="results file (default: results.json)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --out (and --samples)")
    evaluate.add_argument(
        "--eval-data", metavar="DIR", help="read the paper's nine tasks from local copies of their datasets in DIR"
    )
    evaluate.add_argument(
        "--allow-task-code",
        action="store_true",
        help="let task YAML files given to --tasks run Python (!function and the .py files beside them)",
    )
    evaluate.add_argument("--limit", type=_limit, help="examples per task (a fraction if below 1)")
    evaluate.add_argument(
        "--max-length", type=int, help="context window in tokens (default: the training --seq-len, when known)"
    )
    evaluate.add_argument("--batch-size", type=_batch_size, default=8, help="sequences per forward, or auto (GPU)")
    evaluate.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    evaluate.add_argument(
        "--skip-nonstandard", action="store_true", help="remove the non-standard layers (paper Table 1, skip)"
    )
    evaluate.add_argument("--ppl-contexts", type=_int_list, help="context lengths for perplexity, e.g. 128,256,512")
    evaluate.add_argument("--ppl-data", help="text file for --ppl-contexts, or heldout (the --corpus held-out text)")
    evaluate.add_argument("--corpus", default="builtin", help="corpus whose held-out text makes the offline tasks")
    evaluate.add_argument("--samples", metavar="FILE", help="also write the harness's per-sample log (JSON lines)")
    evaluate.add_argument("--table", action="store_true", help="print the Table 1 layout when done")
    evaluate.set_defaults(handler=command_eval)

    table = subcommands.add_parser(
        "table",
        help="the paper's Table 1 layout from results files",
        description="Markdown (printed) and, with --out PREFIX, PREFIX.md and PREFIX.csv, from attnlab eval results.",
    )
    table.add_argument("results", nargs="+", metavar="RESULTS", help="results.json files written by attnlab eval")
    table.add_argument("--out", metavar="PREFIX", help="write PREFIX.md and PREFIX.csv")
    table.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.md and PREFIX.csv")
    table.set_defaults(handler=command_table)

    analyze = subcommands.add_parser(
        "analyze",
        help="attention indicators, pre-softmax activations and figures (paper §4.4, Figs. 1, 2, 5)",
        description="Run checkpoints on held-out text; write OUT/indicators.json (entropy, concentration, head "
        "diversity, sink, local focus 0-3 and pre-softmax activation statistics per layer) and the figures: radar "
        "plots, activation distributions, loss curves, mean attention maps.",
    )
    add_checkpoint_arguments(analyze)
    analyze.add_argument("--out", required=True, help="output folder")
    analyze.add_argument(
        "--data", default="builtin", help="corpus whose held-out text the models read (--data of train)"
    )
    analyze.add_argument("--num-seqs", type=int, default=16, help="held-out sequences")
    analyze.add_argument("--seq-len", type=int, help="tokens per sequence (default: the models' context length)")
    analyze.add_argument("--batch-size", type=int, default=4)
    analyze.add_argument(
        "--metrics",
        nargs="*",
        metavar="RUN",
        help="runs (or metrics.jsonl files) for the loss curves (default: "
        "the checkpoints' own runs; give none to skip)",
    )
    analyze.add_argument("--heatmap-model", type=int, default=0, help="index of the model whose mean maps are drawn")
    analyze.set_defaults(handler=command_analyze)

    recall = subcommands.add_parser(
        "recall",
        help="accuracy on a synthetic recall task (MQAR, induction) of a model trained on one",
        description="Accuracy at the scored positions of held-out examples of a synthetic task (attnlab.synthetic); "
        "the task defaults to the one the checkpoint was trained on (its --data).",
    )
    add_checkpoint_arguments(recall)
    recall.add_argument("--task", help="task spec, e.g. mqar:pairs=8,vocab=128 (default: the run's --data)")
    recall.add_argument("--num-examples", type=_positive_int, default=512, help="held-out examples (default 512)")
    recall.add_argument("--batch-size", type=_positive_int, default=64)
    recall.add_argument("--skip-nonstandard", action="store_true", help="remove the non-standard layers (skip)")
    recall.add_argument("--out", default="recall.json", help="results file (default: recall.json)")
    recall.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    recall.set_defaults(handler=command_recall)

    circuits = subcommands.add_parser(
        "circuits",
        help="per-head previous-token, induction, duplicate-token and sink scores, and head/layer ablations",
        description="Each head's circuit scores on repeated random blocks (attnlab.circuits), and the accuracy "
        "with each layer, and each head, mean- (or zero-) ablated: on a synthetic task's held-out examples (with "
        "MQAR's own previous-token and retrieval scores), or for a model trained on text on held-out text "
        "(next-token accuracy and loss, and the in-context-learning score). Writes OUT/circuits.json and a "
        "heatmap figure per model.",
    )
    add_checkpoint_arguments(circuits)
    circuits.add_argument("--out", required=True, help="output folder")
    circuits.add_argument("--task", help="task spec, e.g. mqar:pairs=4 (default: each run's --data)")
    circuits.add_argument("--data", help="held-out text for models trained on text (default: each run's --data)")
    circuits.add_argument(
        "--num-examples", type=_positive_int, help="held-out task examples (default 256) or text sequences (64)"
    )
    circuits.add_argument("--mode", default="mean", choices=("mean", "zero"), help="ablation (default: mean)")
    circuits.add_argument(
        "--block", type=_positive_int, help="repeated-block length of the scores (default: L/2, ≤ 32)"
    )
    circuits.set_defaults(handler=command_circuits)

    study = subcommands.add_parser(
        "study",
        help="the paper's experiment grid in one resumable command, ending with DIR/report.md",
        description="Train, evaluate and analyse every run of a study preset, up to --jobs at a time, then write "
        "DIR/report.md (Table-1-style table, figures, the paper's claims checked) and DIR/report.csv. Presets: "
        "quick (cpu-tiny, minutes on a laptop), placements:<mixer> (docs/method.md §7 placements and the share of "
        "standard layers), paper-70m, paper-160m, paper-500m (GPU, torchrun on the local devices).",
    )
    study.add_argument(
        "--preset", default="quick", help="quick | placements:<mixer> | paper-70m | paper-160m | paper-500m"
    )
    study.add_argument("--out", help="study folder (default: studies/<preset>)")
    study.add_argument("--resume", action="store_true", help="continue the study in --out, reusing finished runs")
    study.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2; each gets cores/jobs threads)")
    study.add_argument("--dry-run", action="store_true", help="print the runs and their commands, run nothing")
    study.add_argument(
        "--mixers", help="comma-separated registered mixers to train beside standard (default: the paper's six)"
    )
    study.add_argument("--tokens", type=int, help="training tokens of each corpus run (overrides the preset)")
    study.add_argument("--max-steps", type=int, help="optimizer steps of every run (overrides --tokens)")
    study.add_argument("--eval-limit", type=_limit, help="examples per evaluation task (default: all)")
    study.add_argument("--eval-data", metavar="DIR", help="paper presets: read the nine tasks from local copies")
    study.add_argument("--device", help="auto | cpu | cuda (default: the presets')")
    study.add_argument("--executor", default="local", choices=("local", "submitit-local", "slurm"))
    study.add_argument("--slurm-partition", help="Slurm partition (--executor slurm)")
    study.add_argument("--slurm-gpus", type=int, default=8, help="GPUs per Slurm job (default 8)")
    study.add_argument("--slurm-time", type=int, default=24 * 60, help="minutes per Slurm job (default 1440)")
    study.set_defaults(handler=command_study)

    bench = subcommands.add_parser(
        "bench",
        help="measured training, prefill, decode and cache costs of the mixers beside their formulas "
        "(docs/method.md §8)",
        description="Training tokens/s (with --against-hf: beside transformers' Qwen2ForCausalLM, same weights, "
        "same process), its ratio to standard beside the analytic one, MFU, peak step memory and page faults per "
        "training length; prefill time and memory, decode time per token and cache bytes per context length, with "
        "the analytic costs. Writes OUT/bench.json, OUT/bench.md, with the decode section OUT/decode.png and, "
        "with two or more --train-seq-len, OUT/train_throughput.png (.svg).",
    )
    bench.add_argument("--preset", default="cpu-tiny", choices=presets.preset_names())
    bench.add_argument("--out", required=True, help="output folder")
    bench.add_argument("--against-hf", action="store_true", help="also train transformers' Qwen2ForCausalLM (sdpa)")
    bench.add_argument(
        "--bf16", action="store_true", help="train under bf16 autocast (fp32 weights), as attnlab train does on CUDA"
    )
    for name, (kind, help_text) in BENCH_OPTIONS.items():
        bench.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, default=None, help=help_text)
    add_model_arguments(bench)
    bench.set_defaults(handler=command_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"attnlab: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a write that fails after the checks (a full disk, a folder removed meanwhile)
        print(f"attnlab: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; the same command with --resume continues from what was saved" if hasattr(args, "resume") else ""
        print(f"\nattnlab: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
