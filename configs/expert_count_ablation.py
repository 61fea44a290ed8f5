"""Expert-count ablation (Yuan2.0-M32 paper, Table 2): 8 / 16 / 32 experts of equal size,
top-2, Attention Router, 3 seeds each; same tokens, same held-out eval split.

  python -m launch.sweep --backend=local --parallel=2 --num_processes=1 \
      --config=configs/expert_count_ablation.py --workdir=workdir/studies/experts  # the CPU study
  python -m yuanjax.report workdir/studies/experts

Variants as in configs/router_ablation.py (none: CPU study, `smoke`, `gpu`); the model,
data, budget and eval are that file's. More experts of the same size means more total
parameters at the same active parameters per token (the paper's Table 2 design).
"""
import os

from yuanjax import workdir

# configs/ is not a package (config files load by path): the sibling file, by path.
router_ablation = workdir.load_config_module(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), 'router_ablation.py'))

EXPERTS = (8, 16, 32)


def get_config(arg=None):
  return router_ablation.study_config(arg, 'configs/expert_count_ablation.py')


def sweep(arg=None):
  """One run per (expert count, seed); `smoke`: 8 and 16 experts, seeds 0 and 1."""
  router_ablation.study_config(arg, 'configs/expert_count_ablation.py')
  experts, seeds = ((8, 16), (0, 1)) if arg == 'smoke' else (EXPERTS, router_ablation.SEEDS)
  return [{'model.num_experts': e, 'train.seed': s} for e in experts for s in seeds]
