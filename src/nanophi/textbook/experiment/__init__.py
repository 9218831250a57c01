"""The case study: students trained from scratch on the pipeline's arms, measured beside phi-1's numbers.

    nanophi textbook experiment --preset tiny --out runs/case-tiny      (or python -m nanophi.textbook.experiment)

One module per job: `presets` (arms and sizes), `data` (the arms' corpora and held-out splits), `exercises` (the
exercise set mined from doctests), `runner` (the students, the loop over arms and seeds, Jina's teacher
experiment, the CLI), `finetune` (the masked exercise fine-tune), `eval` (pass@k and bits per byte), and the
report: `stats` (intervals and sign tests), `tables`, `figures`, `report` (report.md/html).
"""

from nanophi.textbook.experiment.presets import (ARM_DIRS, ARM_SOURCES, ARMS, BASE_OF, DEFAULT_TEACHER,
                                                 FULL_PRESET_SIZING, PRESETS, SPLIT_SEED, Preset)
from nanophi.textbook.experiment.runner import add_arguments, main, run, run_experiment, teacher_experiment

__all__ = ["ARM_DIRS", "ARM_SOURCES", "ARMS", "BASE_OF", "DEFAULT_TEACHER", "FULL_PRESET_SIZING", "PRESETS",
           "SPLIT_SEED", "Preset", "add_arguments", "main", "run", "run_experiment", "teacher_experiment"]
