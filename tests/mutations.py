"""Deliberate bugs in the maths, the training loop and evaluation, and the tests that must catch each one.

Run it before changing those files (it is not part of CI: it takes a few minutes):

    .venv/bin/python tests/mutations.py            # every mutation
    .venv/bin/python tests/mutations.py --list     # their names
    .venv/bin/python tests/mutations.py NAME ...   # some of them

Each mutation replaces one exact piece of text in one source file, in a copy of `src/` and `tests/` in a
temporary folder (the working tree is never touched), and runs the tests named for it there, the copy's
`src/` first on PYTHONPATH. A mutation is *killed* when those tests fail; one that *survives* is a blind
spot of the suite. The tests are first run once on the unmutated copy, where they must pass. A mutation
whose text is no longer in its file is reported as stale: update it together with the code.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # must occur exactly once in `file`
    new: str
    tests: tuple[str, ...]  # pytest node ids that must fail


RECIPE = "tests/test_recipe.py"
PARITY = (
    "tests/test_model.py::test_all_standard_model_matches_qwen2",
    "tests/test_inspection.py::test_logits_match_spec_forward_where_attention_matters",
)
CACHED_DECODE = "tests/test_cache.py::test_decoding_after_every_prefill_path_equals_the_full_forward"
SPEC_FORWARD = "tests/test_inspection.py::test_logits_match_spec_forward_where_attention_matters"

MUTATIONS = (
    # The training recipe (paper §4: AdamW, warm-up + cosine, weight decay on matrices, clip, accumulation).
    Mutation(
        "loss-not-divided-by-accumulation",
        "src/attnlab/train.py",
        ".loss / accumulation",
        ".loss",
        (f"{RECIPE}::test_two_micro_batches_of_2_take_the_step_of_a_batch_of_4",),
    ),
    Mutation(
        "no-cosine-decay",
        "src/attnlab/train.py",
        "return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))",
        "return 1.0",
        (f"{RECIPE}::test_the_lr_of_every_step_is_warm_up_then_cosine_to_zero",),
    ),
    Mutation(
        "decay-on-biases-and-norms",
        "src/attnlab/optim.py",
        "(decay if parameter.dim() >= 2 else no_decay)",
        "(decay if parameter.dim() < 2 else no_decay)",
        (f"{RECIPE}::test_weight_decay_falls_on_exactly_the_matrices_and_embeddings",),
    ),
    Mutation(
        "clip-value-ignored",
        "src/attnlab/train.py",
        "clip_grad_norm_(raw_model.parameters(), settings.grad_clip)",
        "clip_grad_norm_(raw_model.parameters(), 1.0)",
        (f"{RECIPE}::test_adamw_receives_the_gradient_clipped_to_the_run_norm",),
    ),
    Mutation(
        "betas-swapped",
        "src/attnlab/optim.py",
        "betas = (settings.beta1, settings.beta2)",
        "betas = (settings.beta2, settings.beta1)",
        (f"{RECIPE}::test_every_update_is_adamw_with_the_run_settings",),
    ),
    Mutation(
        "muon-without-nesterov",
        "src/attnlab/optim.py",
        "newton_schulz(grad.add(buffer, alpha=momentum))",
        "newton_schulz(buffer)",
        ("tests/test_optim.py::test_muon_takes_pytorchs_muon_step_with_adamw_matched_rms",),
    ),
    Mutation(
        "muon-without-rms-scale",
        "src/attnlab/optim.py",
        "alpha=-lr * MUON_RMS_SCALE * math.sqrt(max(parameter.shape))",
        "alpha=-lr",
        ("tests/test_optim.py::test_muon_takes_pytorchs_muon_step_with_adamw_matched_rms",),
    ),
    Mutation(
        "warm-up-off-by-one",
        "src/attnlab/train.py",
        "return (step + 1) / warmup_steps",
        "return step / warmup_steps",
        (f"{RECIPE}::test_the_lr_of_every_step_is_warm_up_then_cosine_to_zero",),
    ),
    Mutation(
        "ddp-loss-summed",
        "src/attnlab/train.py",
        "op=dist.ReduceOp.AVG",
        "op=dist.ReduceOp.SUM",
        ("tests/test_train.py::test_two_cpu_processes_match_one_process",),
    ),
    # The mixers (paper §3), where attention matters: maps neither uniform nor one-hot.
    Mutation(
        "standard-scores-x1.01-reference",
        "src/attnlab/mixers/standard.py",
        "scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # [1|batch",
        "scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling * 1.01  # [1|batch",
        PARITY,
    ),
    Mutation(
        "standard-scores-x1.01-fast",
        "src/attnlab/mixers/standard.py",
        "F.scaled_dot_product_attention(query, key, value, is_causal=True)",
        "F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=1.01 * query.shape[-1] ** -0.5)",
        PARITY,
    ),
    Mutation(
        "taylor-second-order-term",
        "src/attnlab/mixers/approximate.py",
        "return 1 + scores + 0.5 * scores * scores",
        "return 1 + scores + scores * scores / 3",
        (SPEC_FORWARD,),
    ),
    Mutation(
        "taylor-unscaled-keys-after-reference-prefill",
        "src/attnlab/mixers/approximate.py",
        "fold_taylor_state((0.0,) * 6, key * self.scaling**0.5, value, keep)",
        "fold_taylor_state((0.0,) * 6, key, value, keep)",
        (CACHED_DECODE,),
    ),
    Mutation(
        "nonapprox-gate",
        "src/attnlab/mixers/nonapprox.py",
        "query = F.silu(query)",
        "query = torch.sigmoid(query)",
        (SPEC_FORWARD,),
    ),
    Mutation(
        "shadow-qk-without-pre-norm",
        "src/attnlab/model.py",
        "qk_source = self.input_layernorm(stream.shadow_states[source_kind][self.layer_idx], reference)",
        "qk_source = stream.shadow_states[source_kind][self.layer_idx]",
        (SPEC_FORWARD,),
    ),
    Mutation(
        "staticembqk-without-pre-norm",
        "src/attnlab/model.py",
        "qk_source = self.input_layernorm(stream.static_embeddings, reference)",
        "qk_source = stream.static_embeddings",
        (SPEC_FORWARD,),
    ),
    Mutation(
        "position-ids-ignored",
        "src/attnlab/model.py",
        "if position_ids is None:",
        "if True:",
        ("tests/test_model.py::test_explicit_position_ids_reach_rope_as_in_qwen2",),
    ),
    Mutation(
        "logits-to-keep-tensor-sorted",
        "src/attnlab/model.py",
        "hidden_states[:, logits_to_keep]",
        "hidden_states[:, logits_to_keep.sort().values]",
        ("tests/test_model.py::test_logits_to_keep_selects_rows_as_transformers_does",),
    ),
    # Evaluation and the report (paper §5 tables and Table 4).
    Mutation(
        "ppl-context-ignored",
        "src/attnlab/evaluation.py",
        "harness_lm(loaded, batch_size, max_length=context)",
        "harness_lm(loaded, batch_size)",
        ("tests/test_eval.py::test_perplexity_by_context_equals_rolling_windows_by_hand",),
    ),
    Mutation(
        "ppl-word-count",
        "src/attnlab/tasks/__init__.py",
        "words = len(text.split())",
        "words = len(text.split()) + 1",
        ("tests/test_eval.py::test_perplexity_by_context_equals_rolling_windows_by_hand",),
    ),
    Mutation(
        "eval-bf16-ignored",
        "src/attnlab/evaluation.py",
        '"bfloat16": torch.bfloat16,',
        '"bfloat16": torch.float32,',
        ("tests/test_eval.py::test_eval_in_reduced_precision_records_the_dtype_and_tracks_float32",),
    ),
    Mutation(
        "form-claim-order-only",
        "src/attnlab/report.py",
        "if nonapprox_ratio < COLLAPSE_PPL_RATIO * approx_ratio:",
        "if False:",
        ("tests/test_study.py::test_form_claim_follows_the_numbers",),
    ),
    Mutation(
        "sequence-claim-ignores-recall",
        "src/attnlab/report.py",
        "if ratio <= 1.0 or not worse_recall:",
        "if ratio <= 1.0:",
        ("tests/test_study.py::test_sequence_dependency_claim_follows_the_numbers",),
    ),
)


def _copy_of_repository(folder: Path) -> Path:
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "pyproject.toml", folder / "pyproject.toml")
    return folder


def _run_tests(copy: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(copy / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True)


def _apply(copy: Path, mutation: Mutation) -> str | None:
    """Mutate the copy; returns the original text, or None if the mutation is stale."""
    path = copy / mutation.file
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return None
    path.write_text(original.replace(mutation.old, mutation.new))
    return original


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and the tests that kill them")
    args = parser.parse_args(argv)
    known = {mutation.name: mutation for mutation in MUTATIONS}
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)}; see --list")
    chosen = [known[name] for name in args.names] if args.names else list(MUTATIONS)
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}: {mutation.file}: {mutation.old!r} → {mutation.new!r}; {' '.join(mutation.tests)}")
        return 0

    with tempfile.TemporaryDirectory(prefix="attnlab-mutations-") as folder:
        copy = _copy_of_repository(Path(folder))
        tests = tuple(dict.fromkeys(test for mutation in chosen for test in mutation.tests))
        baseline = _run_tests(copy, tests)
        if baseline.returncode != 0:
            print(baseline.stdout[-3000:] + baseline.stderr[-2000:])
            print("mutations: the tests fail without any mutation; fix them first", file=sys.stderr)
            return 2
        survivors = []
        for mutation in chosen:
            original = _apply(copy, mutation)
            if original is None:
                print(f"STALE     {mutation.name}: its text is not (exactly once) in {mutation.file}")
                survivors.append(mutation.name)
                continue
            try:
                result = _run_tests(copy, mutation.tests)
            finally:
                (copy / mutation.file).write_text(original)
            killed = result.returncode != 0
            print(f"{'killed' if killed else 'SURVIVED':9} {mutation.name}")
            if not killed:
                survivors.append(mutation.name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
