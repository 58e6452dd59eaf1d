"""The `attnlab` command: thin subcommands that parse arguments and call library code.

Bad input ends with one line on stderr (`attnlab: error: …`) and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from . import presets

# Architecture flags shared by subcommands that build a model: flag → AttnLabConfig field.
MODEL_FLAGS = {
    "--vocab-size": ("vocab_size", int),
    "--hidden-size": ("hidden_size", int),
    "--intermediate-size": ("intermediate_size", int),
    "--num-hidden-layers": ("num_hidden_layers", int),
    "--num-attention-heads": ("num_attention_heads", int),
    "--num-key-value-heads": ("num_key_value_heads", int),
    "--head-dim": ("head_dim", int),
}
MODEL_SWITCHES = {"--qk-norm": "qk_norm", "--tie-word-embeddings": "tie_word_embeddings", "--attention-bias": "attention_bias"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model architecture (override the preset)")
    for flag, (field, kind) in MODEL_FLAGS.items():
        group.add_argument(flag, dest=field, type=kind, default=None, metavar="N")
    for flag, field in MODEL_SWITCHES.items():
        group.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None)


def model_overrides(args: argparse.Namespace) -> dict:
    fields = [field for field, _ in MODEL_FLAGS.values()] + list(MODEL_SWITCHES.values())
    return {field: getattr(args, field) for field in fields if getattr(args, field) is not None}


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
        counts = variant_counts(options)
        report.append((title, counts))
    if args.format == "json":
        print(json.dumps({title: [asdict(count) for count in counts] for title, counts in report}, indent=2))
    else:
        print("\n\n".join(format_table(title, counts) for title, counts in report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnlab", description="Which parts of attention matter? (Deconstructing Attention, arXiv 2510.11602)"
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    params = subcommands.add_parser(
        "params",
        help="parameter counts of the seven variants, uniform and hybrid",
        description="Parameter counts of all seven mixers, uniform and hybrid, on the meta device (no memory). "
        "With no preset and no flags: every paper preset and cpu-tiny.",
    )
    params.add_argument(
        "--preset", action="append", choices=presets.preset_names(), help="preset to count (repeatable)"
    )
    params.add_argument("--format", choices=("markdown", "json"), default="markdown")
    add_model_arguments(params)
    params.set_defaults(handler=command_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:
        print(f"attnlab: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
