"""The flag tables of `attnlab train`: each command-line flag and the config field it sets.

They are shared by the parser (`attnlab.cli`, which adds a flag per entry and reads the parsed values back
into `AttnLabConfig` / `TrainConfig` overrides) and by the study's command builder (`attnlab.study`, which
writes a run's overrides as the same flags), so a study's printed command line is exactly what it runs.
"""

from __future__ import annotations

import argparse
import json


def json_object(text: str) -> dict:
    """A JSON object given as a flag's value, e.g. `--mixer-options '{"slidingwindow": {"window": 32}}'`."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({error.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object ({{...}}), got {text!r}")
    return value


# Architecture flags shared by subcommands that build a model: flag → AttnLabConfig field.
MODEL_FLAGS = {
    "--vocab-size": ("vocab_size", int),
    "--hidden-size": ("hidden_size", int),
    "--intermediate-size": ("intermediate_size", int),
    "--num-hidden-layers": ("num_hidden_layers", int),
    "--num-attention-heads": ("num_attention_heads", int),
    "--num-key-value-heads": ("num_key_value_heads", int),
    "--head-dim": ("head_dim", int),
    "--max-position-embeddings": ("max_position_embeddings", int),
    "--rope-theta": ("rope_theta", float),
    "--mixer-options": ("mixer_options", json_object),  # {mixer: {option: value}} for mixers that take any
}
MODEL_SWITCHES = {
    "--qk-norm": "qk_norm",
    "--tie-word-embeddings": "tie_word_embeddings",
    "--attention-bias": "attention_bias",
}

# `attnlab train` flags: flag → (TrainConfig field, type, help).
TRAIN_FLAGS = {
    "--data": ("data", str, "builtin | hf:<name>[:<config>] | .txt/.jsonl/.jsonl.zst/.parquet files, globs, folders"),
    "--tokenizer": ("tokenizer", str, "AutoTokenizer name or path, or bpe:<vocab> (trained on the training text)"),
    "--seq-len": ("seq_len", int, "tokens per sequence"),
    "--batch-size": ("batch_size", int, "sequences per micro-batch per device"),
    "--global-batch-size": ("global_batch_size", int, "sequences per optimizer step (gradient accumulation)"),
    "--tokens": ("tokens", int, "token budget"),
    "--max-steps": ("max_steps", int, "optimizer steps (overrides --tokens)"),
    "--lr": ("lr", float, "peak learning rate"),
    "--warmup-steps": ("warmup_steps", int, "linear warm-up steps"),
    "--optimizer": ("optimizer", str, "adamw | muon (Muon for the decoder's hidden matrices, AdamW for the rest)"),
    "--weight-decay": ("weight_decay", float, "weight decay on matrices and embeddings"),
    "--beta1": ("beta1", float, "AdamW beta1"),
    "--beta2": ("beta2", float, "AdamW beta2"),
    "--seed": ("seed", int, "seed of initialisation and data order"),
    "--save-every": ("save_every", int, "steps between checkpoints"),
    "--keep-checkpoints": ("keep_checkpoints", int, "newest checkpoints kept"),
    "--eval-every": ("eval_every", int, "steps between held-out evaluations"),
    "--eval-sequences": ("eval_sequences", int, "held-out sequences per evaluation"),
    "--max-nonfinite-skips": ("max_nonfinite_skips", int, "non-finite batches to skip before stopping"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N"),
    "--parallel": ("parallel", str, "under torchrun: auto | ddp | fsdp"),
}
TRAIN_SWITCHES = {
    "--compile": "compile",
    "--activation-checkpointing": "activation_checkpointing",
    "--tensorboard": "tensorboard",
    "--wandb": "wandb",
    "--save-best": "save_best",
    "--shifted-windows": "shifted_windows",
}
