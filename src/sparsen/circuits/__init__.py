"""Circuit discovery with discrete codes (O'Neill & Bui, arXiv 2405.12522) on a model's attention heads, checked
against a ground truth computed on the same model by per-head activation patching.

``tasks``: the IOI, greater-than and docstring prompt pairs; ``heads``: per-head outputs and interventions on z;
``codes``: the shared SAE, argmax codes and the node / pair scores; ``truth``: patching, the ground-truth sets, the
mean-ablation check and the baselines; ``run``: the pipeline of one task (``run_circuits``).
"""

from sparsen.circuits.run import CircuitConfig, roc_auc, run_circuits, summary_markdown
from sparsen.circuits.tasks import TASKS, Task, build_task

__all__ = ["TASKS", "CircuitConfig", "Task", "build_task", "roc_auc", "run_circuits", "summary_markdown"]
