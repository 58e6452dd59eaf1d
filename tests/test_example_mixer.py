"""The public mixer API from outside the package: `examples/my_mixer`, installed with pip, is found through its
`attnlab.mixers` entry point by a fresh interpreter that never imports it, and goes through train → eval →
analyze → bench → generate → study like a built-in mixer."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_mixer"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example installed (no dependencies, no build isolation: offline) into a folder of its own, built from
    a copy (a build writes beside the sources)."""
    source, target = tmp_path_factory.mktemp("example") / "my_mixer", tmp_path_factory.mktemp("site")
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*command, str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert list(target.glob("attnlab_my_mixer-*.dist-info/entry_points.txt"))
    return target


def run_fresh(site: Path, script: str, cwd: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=environment, capture_output=True, text=True
    )


def test_the_example_passes_its_own_reference_tests(site, tmp_path):
    result = run_fresh(
        site,
        f"import pytest; raise SystemExit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(EXAMPLE / 'tests')!r}]))",
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


END_TO_END = """
    import json, sys
    import torch
    from attnlab import cli
    from attnlab.mixers import registry

    tiny = ["--hidden-size", "32", "--intermediate-size", "64", "--num-hidden-layers", "2",
            "--num-attention-heads", "2"]
    recipe = ["--data", "builtin", "--tokenizer", "bpe:512", "--seq-len", "32", "--batch-size", "4",
              "--global-batch-size", "4", "--max-steps", "3", "--warmup-steps", "1", "--eval-every", "0",
              "--no-tensorboard"]
    window = ["--mixer-options", '{"slidingwindow": {"window": 8}}']
    facts = {"registered_before_use": "slidingwindow" in registry._registry}
    status = {}
    status["train"] = cli.main(["train", "--preset", "cpu-tiny", "--layers", "hybrid:slidingwindow", *tiny, *recipe,
                                *window, "--out", "run"])
    status["eval"] = cli.main(["eval", "run", "--tasks", "heldout", "--limit", "4", "--out", "eval"])
    status["analyze"] = cli.main(["analyze", "run", "--out", "analysis", "--num-seqs", "2", "--seq-len", "32"])
    status["bench"] = cli.main(["bench", "--mixers", "slidingwindow", "--sections", "train,prefill,decode,cache",
                                "--contexts", "16", "--train-seq-len", "32", "--train-batch-size", "2",
                                "--repeats", "1", "--warmup", "0", "--train-steps", "1", "--decode-tokens", "2",
                                "--decode-batch-size", "2", *tiny, "--out", "bench"])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("run").eval()
    prompt = torch.tensor([[5, 6, 7, 8]])
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    recomputed = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    facts["mixer_types"] = model.config.mixer_types
    facts["mixer_packages"] = model.config.mixer_packages
    facts["window"] = model.model.layers[0].self_attn.window
    facts["generate_equal"] = bool(torch.equal(cached, recomputed)) and cached.shape[1] == 10
    status["study"] = cli.main(["study", "--preset", "quick", "--mixers", "standard,slidingwindow", "--dry-run",
                                "--out", "study-plan"])
    from attnlab.study import Run, Study, run_study
    train = {"tokenizer": "bpe:512", "seq_len": 32, "batch_size": 4, "global_batch_size": 4, "max_steps": 2,
             "warmup_steps": 1, "eval_every": 0, "tensorboard": False}
    model_options = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    runs = [Run(f"corpus-{kind}", "corpus", kind, mixer, layers, "cpu-tiny", model_options, train, tasks="heldout",
                eval_args=("--limit", "4"))
            for kind, mixer, layers in [("standard", "standard", "uniform:standard"),
                                        ("hybrid", "slidingwindow", "hybrid:slidingwindow")]]
    result = run_study(Study("mine", runs, [], "example"), "study", cli.main, jobs=1, progress=False)
    facts["study_failed"] = result["failed"]
    json.dump({"status": status, "facts": facts}, open("facts.json", "w"))
"""


@pytest.fixture(scope="module")
def finished(site, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("mine")
    result = run_fresh(site, END_TO_END, folder)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return folder


def test_the_example_mixer_goes_through_every_command_without_changes_to_attnlab(finished):
    outcome = json.loads((finished / "facts.json").read_text())
    assert outcome["status"] == {"train": 0, "eval": 0, "analyze": 0, "bench": 0, "study": 0}
    facts = outcome["facts"]
    assert facts["registered_before_use"] is False  # found through the entry point, never imported by hand
    assert facts["mixer_types"] == ["slidingwindow", "standard"]
    assert facts["mixer_packages"] == {"slidingwindow": "attnlab-my-mixer"}
    assert facts["window"] == 8 and facts["generate_equal"] and facts["study_failed"] == []

    heldout = json.loads((finished / "eval").read_text())["results"]["heldout"]
    assert heldout["word_perplexity,none"] > 1
    indicators = json.loads((finished / "analysis" / "indicators.json").read_text())
    assert any(layer.get("mixer") == "slidingwindow" for layer in indicators["layers"])
    bench = json.loads((finished / "bench" / "bench.json").read_text())
    assert "slidingwindow" in bench["decode"]
    report = (finished / "study" / "report.md").read_text()
    assert "| hybrid | slidingwindow |" in report


def test_a_model_whose_mixer_package_is_missing_says_what_to_install(finished):
    result = run_fresh(
        finished / "no-site",
        "from attnlab import AttnLabForCausalLM\nAttnLabForCausalLM.from_pretrained('run')",
        finished,
    )
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "the mixer 'slidingwindow' from 'attnlab-my-mixer'" in message, message
    assert "pip install attnlab-my-mixer" in message
