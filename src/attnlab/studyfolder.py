"""What a study folder holds and the layer lists of its share sweep: the names that `attnlab.study`, which
writes the folder, and `attnlab.report`, which reads it back, agree on.

    DIR/study.json                      the study (its runs and analyses)
    DIR/runs/NAME/                      a run's training output folder (`run_folder`): model, metrics.jsonl, …
    DIR/runs/NAME/study/                the study's own files for the run (`STUDY_FILES`): log.txt,
                                        stages/<stage>.json, results.json, skip.json, recall*.json
    DIR/analysis/NAME/                  an `attnlab analyze` output folder
    DIR/report.md, DIR/report.csv       the report
"""

from __future__ import annotations

from pathlib import Path

STUDY_FILES = "study"  # runs/NAME/study/: the log, stage records and evaluation results of a run


def run_folder(out: Path, name: str) -> Path:
    """The training output folder of run `name` in the study folder `out`."""
    return out / "runs" / name


def share_pattern(mixer: str, standard_layers: int, num_layers: int) -> str:
    """A layer list with `standard_layers` standard layers spread evenly over `num_layers` (the last layer
    is standard first, as in the paper's hybrid), the mixer everywhere else."""
    keep = {num_layers - round(i * num_layers / standard_layers) for i in range(standard_layers)}
    return ",".join("standard" if layer in keep else mixer for layer in range(1, num_layers + 1))
