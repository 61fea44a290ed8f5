# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Scale-out: will the released M32 fit, and where does each parameter live?
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/yuanjax/yuanjax/blob/main/notebooks/04_scale_out.ipynb)
#
# `yuanjax.plan` builds the train state of Yuan2.0-M32 abstractly (nothing is allocated, so this
# runs on a laptop for any device count) and counts, per device, the bytes of parameters, AdamW
# state, gradients and an activation estimate; a mesh fits an accelerator when that is under 85%
# of its memory. The same numbers as `python -m yuanjax.plan` (formulas in `yuanjax/plan.py`).

# %%
# Install yuanjax where it is missing (Colab); a no-op where it imports (CI, a local checkout).
try:
  import yuanjax  # noqa: F401
except ImportError:
  import subprocess
  import sys
  subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q',
                         'yuanjax[notebooks] @ git+https://github.com/yuanjax/yuanjax'])

# %%
import collections

from IPython.display import Markdown, display

from yuanjax import config_lib, plan
from yuanjax.analysis import notebook, plots

SMOKE = notebook.smoke()
GiB = 2 ** 30

# %% [markdown]
# ## Meshes
#
# Each entry: devices, the mesh axes (`data`, `fsdp`, `expert`, `tensor`; `-1` takes the rest),
# remat and gradient accumulation. The global batch stays M32's (`configs/yuan_m32.py`); more
# accumulation steps mean fewer tokens per micro-batch, hence less activation memory.

# %%
MESHES = collections.OrderedDict([
    ('8 dev: expert 8', (8, dict(expert=8), 'full', 48)),
    ('16 dev: fsdp 2 × expert 8', (16, dict(fsdp=2, expert=8), 'full', 48)),
    ('32 dev: fsdp 4 × expert 8', (32, dict(fsdp=4, expert=8), 'full', 48)),
    ('32 dev: data 4 × expert 8', (32, dict(data=4, expert=8), 'full', 48)),
    ('64 dev: fsdp 8 × expert 8', (64, dict(fsdp=8, expert=8), 'full', 24)),
    ('64 dev: fsdp 8 × expert 8, no remat', (64, dict(fsdp=8, expert=8), 'none', 24)),
])
if SMOKE:
  MESHES = collections.OrderedDict(list(MESHES.items())[1:3])


def m32_config(mesh: dict, remat: str, grad_accum: int):
  config = config_lib.m32_pretraining()     # configs/yuan_m32.py's config
  config.mesh.update({**dict(data=1, fsdp=1, expert=1, tensor=1), **mesh})
  config.model.remat = remat
  config.train.grad_accum = grad_accum
  return config


results = {name: plan.plan(m32_config(mesh, remat, accum), devices)
           for name, (devices, mesh, remat, accum) in MESHES.items()}
kinds = list(next(iter(results.values()))['fits'])
# Each accelerator is judged with the attention it runs (splash on TPUs, cuDNN on GPUs; no
# L x L scores): its own GiB per device, and ✅ where that fits 85% of its memory.
rows = [[name, r['remat'], f"{r['micro_batch_tokens_per_device']:g}"] + [
    f"{r['device_total'][k] / GiB:.1f} {'✅' if r['fits'][k] else '—'}" for k in kinds
] for name, r in results.items()]
display(Markdown(notebook.markdown_table(
    ['mesh', 'remat', 'tokens/device/micro-batch'] + [f'{k} GiB/device' for k in kinds], rows)))

# %%
r0 = next(iter(results.values()))
limits = {k: r0['headroom'] * r0['device_memory_gib'][k] for k in kinds}
fig = plots.memory_bars({name: {k: v / GiB for k, v in r['per_device'].items()}
                         for name, r in results.items()}, limits,
                        title='Yuan2.0-M32 training state per device (XLA attention, as on a '
                        'CPU; the table above has each accelerator\'s own)')

# %% [markdown]
# ## Where every parameter lives
#
# The logical axis names each parameter carries (`vocab`, `embed`, `heads`, `mlp`, `expert`, ...)
# map to mesh axes through `config.mesh.rules`; the table shows the result for one mesh: the
# PartitionSpec of each parameter (one entry per dimension; `None` = replicated along it) and
# its bytes per device. The 24 layers are stacked on a leading `layers` axis (`nn.scan`); the
# experts' `w1`/`w2` split over `expert`, the rest over `fsdp`.

# %%
name = list(results)[-1 if not SMOKE else 0]
leaves = [x for x in results[name]['leaves'] if x['part'] == 'params']
rows = [[x['path'].replace("']['", '/').strip("[']"), '×'.join(map(str, x['shape'])),
         str(tuple(x['spec'])), f"{x['per_device_bytes'] / 2**20:,.1f}",
         f"{x['total_bytes'] / x['per_device_bytes']:.0f}"] for x in leaves]
display(Markdown(f'**{name}**\n\n' + notebook.markdown_table(
    ['parameter', 'shape', 'mesh axes per dim', 'MiB/device', 'split into'], rows)))
