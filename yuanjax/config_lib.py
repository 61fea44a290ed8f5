"""Shared config pieces: the released Yuan2.0-M32 and Mixtral-8x7B model configs, validation.

Experiment files in `configs/` build on `m32_model()` (or `mixtral_model()`); `validate_model`
checks a model config before anything compiles and names the field and the rule on failure.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from yuanjax import step_guard
from yuanjax.model import attention, grouped_matmul, moe, routers, transformer


def m32_model() -> ml_collections.ConfigDict:
  """Yuan2.0-M32 exactly as released (paper, Megatron script, HF config.json and modelling code)."""
  return ml_collections.ConfigDict(
      dict(
          vocab_size=135040,
          hidden_size=2048,
          num_layers=24,
          num_heads=16,
          num_kv_heads=0,  # G key/value heads, dividing num_heads (grouped-query); 0: num_heads
          head_dim=256,
          rotary_dims=128,  # rotary on the first 128 of 256 dims per head
          rope_base=10000.0,
          rope_ntk_factor=1.0,  # 4.0 -> the 16K NTK-aware base 40890
          rope_hf_bf16=False,  # True: HF's bfloat16-rounded rotary angles (spec quirk 3)
          max_seq_len=4096,
          norm_eps=1e-6,
          attention_type='lfa',  # 'lfa' (Yuan) | 'standard' (q, k from the normed input)
          tie_embeddings=True,  # False: a separate lm_head [V, D]
          init_std=0.02,
          dtype='bfloat16',  # compute dtype; router, softmax and loss stay float32
          param_dtype='float32',
          attention_backend='auto',  # splash on TPU, cudnn on GPU, XLA elsewhere (docs/model.md)
          splash={b: 512 for b in attention.SPLASH_BLOCKS},  # 'splash' tiles (MaxText's 512)
          attention_query_blocks=1,  # 'xla' backend: n > 1 skips most of the masked half
          remat='none',
          scan_unroll=1,  # decoder blocks per scan iteration (>= their number: no loop)
          loss_chunk_len=1024,  # the loss scores chunks of this many positions; 0: whole
          loss_unroll=False,  # the loss's chunks without a loop (the FLOP analysis sets it)
          num_experts=32,
          moe_every=1,  # every layer MoE; n: every n-th layer; 0: all dense
          dense_ffn_size=8192,  # FFN size of the dense layers (unused when moe_every=1)
          router=dict(
              type='attention',
              top_k=2,
              norm_topk_prob=True,
              jitter_eps=0.0,
              noisy_topk=False,
              load_balance_weight=0.0,  # released M32: no load-balancing loss
              z_loss_weight=0.0,
              num_shared_experts=0,
          ),
          moe=dict(
              dispatch='capacity',  # fastest measured, on H100 and CPU (docs/model.md)
              capacity_factor=1.25,
              ffn_size=8192,  # per-expert FFN size
              # dropless only: ragged_dot | megablox (TPU) | tokamax (GPU; pip extra)
              grouped_matmul='ragged_dot',
              megablox_tiling=(128, 128, 128),  # (tm, tk, tn), yuanjax.model.grouped_matmul
          ),
      ))


def tiny_model() -> ml_collections.ConfigDict:
  """M32's structure at CPU size: LFA, attention router, 8 experts top-2, partial rotary."""
  m = m32_model()
  m.update(
      dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, head_dim=32, rotary_dims=16,
           max_seq_len=256, dtype='float32', attention_backend='xla', num_experts=8,
           dense_ffn_size=128))
  m.moe.ffn_size = 64
  return m


def mixtral_model() -> ml_collections.ConfigDict:
  """Mixtral-8x7B (Jiang et al. 2024; HF mistralai/Mixtral-8x7B-v0.1 config.json): standard
  attention with 8 key/value heads, rotary over the whole head (theta 1e6), RMSNorm eps 1e-5,
  the linear router (softmax, top-2, renormalised over the two), untied lm_head. The dispatch
  stays M32's training choice (capacity 1.25, which can drop slots); HF import and generation
  switch to 'dropless', which computes Mixtral's forward exactly."""
  m = m32_model()
  m.update(
      dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
           head_dim=128, rotary_dims=128, rope_base=1e6, max_seq_len=32768, norm_eps=1e-5,
           attention_type='standard', tie_embeddings=False, num_experts=8, dense_ffn_size=14336))
  m.router.update(
      dict(type='linear', top_k=2, norm_topk_prob=True,
           load_balance_weight=routers.weight_from_pooled_coef(0.02, 2, 32)))  # HF: 0.02
  m.moe.ffn_size = 14336
  return m


def small_model() -> ml_collections.ConfigDict:
  """The demo's and the CPU ablation studies' model: tiny_model's structure at d 128 x 4 layers
  with a 4096-token vocabulary."""
  m = tiny_model()
  m.update(dict(vocab_size=4096, hidden_size=128, num_layers=4))
  m.moe.ffn_size = 192
  return m


def check_variant(arg, variants, name: str) -> None:
  """A config file's `:arg` check: a ValueError naming the file (`name`) and its variants."""
  if arg not in variants:
    names = ['none' if v is None else v for v in variants]
    expected = ', '.join(names[:-1]) + f' or {names[-1]}'
    raise ValueError(f'{name}: unknown variant {arg!r} (expected {expected})')


def short_run(config: ml_collections.ConfigDict, num_steps: int = 4, log_every: int = 1,
              eval_steps: int = 1, checkpoint_every: int = 2) -> None:
  """A `runlocal` variant's training settings, in place: a few steps, no periodic eval, no
  progress bar, 4 sampled tokens, frequent checkpoints (for tests and a quick look)."""
  config.train.update(
      dict(num_steps=num_steps, log_every=log_every, eval_every=0, eval_steps=eval_steps,
           sample_tokens=4, progress=False))
  config.checkpoint.every = checkpoint_every


def runlocal(config: ml_collections.ConfigDict, model: ml_collections.ConfigDict) -> None:
  """An experiment's `runlocal` variant, in place: `model` (its structure at CPU size) for
  `short_run`'s 4 steps of 4 x 64 tokens on a small byte-level corpus."""
  config.model = model
  config.train.update(dict(batch_size=4, seq_len=64))
  config.optimizer.warmup_steps = 2
  config.data.update(dict(vocab_size=model.vocab_size, max_bytes=300_000))
  short_run(config)


ABLATION_ROUTERS = ('attention', 'linear', 'shared')  # the paper's Table 1 routers


def router_overrides(router: str, ffn_size: int) -> dict:
  """A router-ablation variant of an 8-expert top-2 model. `shared`: 2 shared + top-2 of 14
  routed experts of half the FFN (the paper's; the same total and active parameters)."""
  if router != 'shared':
    return {'model.router.type': router}
  return {
      'model.router.type': 'shared',
      'model.router.num_shared_experts': 2,
      'model.num_experts': 14,
      'model.moe.ffn_size': ffn_size // 2
  }


def router_sweep(types) -> list[dict]:
  """One variant per router type on the same model; 'shared' adds 2 always-on experts to the
  routed ones (more active parameters: `router_overrides` keeps them equal)."""
  shared = {'model.router.num_shared_experts': 2}
  return [{'model.router.type': t, **(shared if t == 'shared' else {})} for t in types]


def override(config: ml_collections.ConfigDict, overrides, name: str = 'config') -> None:
  """Sets dotted fields in place, e.g. {'moe.dispatch': 'dense'}; a field that does not
  exist is a KeyError naming it (`name` is how `config` is called in the message)."""
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for k in path:
      node = node[k]
    if last not in node:
      raise KeyError(f'{name} has no field {key!r}')
    node[last] = value


# config.model fields added after configs were first saved (training workdirs' checkpoint meta,
# converted dirs' config.json), each with the value that gives a config saved before it existed
# the behaviour it had then. Mostly m32_model()'s default; not always: loss_chunk_len is 1024
# in m32_model() but 0 here, since before the field the loss took the logits in one piece.
SAVED_CONFIG_DEFAULTS = {
    'rope_hf_bf16': False,
    'attention_query_blocks': 1,
    'scan_unroll': 1,
    'loss_chunk_len': 0,
    'loss_unroll': False,
    'num_kv_heads': 0,
    'attention_type': 'lfa',
    'tie_embeddings': True,
    'moe.grouped_matmul': 'ragged_dot',
    'moe.megablox_tiling': grouped_matmul.DEFAULT_MEGABLOX_TILING,
    'splash': {
        b: 512 for b in attention.SPLASH_BLOCKS
    },  # read only if a run now asks for it
}


def upgrade(saved) -> ml_collections.ConfigDict:
  """config.model as restored from a saved config (a dict or ConfigDict, left untouched), with
  each field added since it was saved (SAVED_CONFIG_DEFAULTS) set to its old behaviour: the one
  door every restore goes through, so code reads `m.field` directly."""
  m = ml_collections.ConfigDict(saved.to_dict() if hasattr(saved, 'to_dict') else saved)
  for key, value in SAVED_CONFIG_DEFAULTS.items():
    *path, last = key.split('.')
    node = m
    for k in path:
      node = node[k]
    if last not in node:
      node[last] = value
  return m


DTYPES = ('float32', 'bfloat16', 'float16')  # config.model.dtype and param_dtype


def _err(field, value, rule):
  return ValueError(f'config.model.{field}={value!r}: {rule}')


def _validate_attention(m: ml_collections.ConfigDict) -> None:
  kind, G, raw = m.attention_type, attention.num_kv_heads(m), m.num_kv_heads
  if kind not in attention.ATTENTION_TYPES:
    raise _err('attention_type', kind, f'expected one of {attention.ATTENTION_TYPES}')
  if kind == 'lfa' and m.hidden_size % 2:
    raise _err('hidden_size', m.hidden_size, 'must be even (the LFA convolution halves it)')
  if type(raw) is not int or raw < 0 or m.num_heads % G:  # bool and None are refused
    raise _err('num_kv_heads', m.num_kv_heads,
               f'must be 0 (= num_heads) or a positive integer dividing num_heads={m.num_heads}')
  if not isinstance(m.tie_embeddings, bool):
    raise _err('tie_embeddings', m.tie_embeddings, 'must be True or False')


def _validate_attention_backend(m: ml_collections.ConfigDict) -> None:
  backend = m.attention_backend
  if backend not in attention.ATTENTION_BACKENDS:
    raise _err('attention_backend', backend, f'expected one of {attention.ATTENTION_BACKENDS}')
  if backend == 'cudnn' and m.dtype not in attention.CUDNN_DTYPES:
    raise _err('dtype', m.dtype, f"attention_backend='cudnn' needs one of {attention.CUDNN_DTYPES}")
  if backend == 'cudnn' and m.head_dim > 256:
    raise _err('head_dim', m.head_dim, "attention_backend='cudnn' takes at most 256")
  if backend in ('splash', 'auto'):
    attention.splash_block_sizes(m.splash)  # errors name config.model.splash.<block>


def validate_model(m: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the field and the rule for the first bad value."""
  for f in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'head_dim', 'max_seq_len'):
    if not isinstance(m[f], int) or m[f] < 1:
      raise _err(f, m[f], 'must be a positive integer')
  _validate_attention(m)
  if m.rotary_dims % 2 or not 0 <= m.rotary_dims <= m.head_dim:
    raise _err('rotary_dims', m.rotary_dims, f'must be even and in [0, head_dim={m.head_dim}]')
  if m.rope_ntk_factor < 1.0:
    raise _err('rope_ntk_factor', m.rope_ntk_factor, 'must be >= 1 (1 = plain rotary)')
  _validate_attention_backend(m)
  for f in ('scan_unroll', 'attention_query_blocks'):
    if not isinstance(m[f], int) or m[f] < 1:
      raise _err(f, m[f], 'must be a positive integer')
  if m.attention_query_blocks > 1 and m.attention_backend != 'xla':
    raise _err('attention_query_blocks', m.attention_query_blocks,
               f"only the 'xla' attention_backend splits queries (not {m.attention_backend!r})")
  if m.remat not in transformer.REMAT_POLICIES:
    raise _err('remat', m.remat, f'expected one of {sorted(transformer.REMAT_POLICIES)}')
  for f in ('dtype', 'param_dtype'):
    if m[f] not in DTYPES:
      raise _err(f, m[f], f'expected one of {DTYPES}')
  chunk = m.loss_chunk_len
  if not isinstance(chunk, int) or chunk < 0:
    raise _err('loss_chunk_len', chunk, 'must be an integer >= 0 (0: the logits in one piece)')
  if not isinstance(m.loss_unroll, bool):
    raise _err('loss_unroll', m.loss_unroll, 'must be True or False')
  if m.moe_every < 0 or (m.moe_every and m.num_layers % m.moe_every):
    raise _err('moe_every', m.moe_every,
               f'must be 0 (all dense) or divide num_layers={m.num_layers}')
  if m.moe_every == 0:
    return
  r = m.router
  if r.type not in routers.ROUTERS:
    raise _err('router.type', r.type, f'expected one of {sorted(routers.ROUTERS)}')
  if m.num_experts < 1:
    raise _err('num_experts', m.num_experts, 'must be >= 1')
  if not 1 <= r.top_k <= m.num_experts:
    raise _err('router.top_k', r.top_k, f'must be in [1, num_experts={m.num_experts}]')
  if r.type == 'shared' and r.num_shared_experts < 1:
    raise _err('router.num_shared_experts', r.num_shared_experts,
               "must be >= 1 with router.type='shared'")
  if r.num_shared_experts < 0:
    raise _err('router.num_shared_experts', r.num_shared_experts, 'must be >= 0')
  for f in ('jitter_eps', 'load_balance_weight', 'z_loss_weight'):
    if r[f] < 0:
      raise _err(f'router.{f}', r[f], 'must be >= 0')
  if r.jitter_eps >= 1:
    raise _err('router.jitter_eps', r.jitter_eps, 'must be < 1')
  if m.moe.dispatch not in moe.DISPATCHES:
    raise _err('moe.dispatch', m.moe.dispatch, f'expected one of {tuple(moe.DISPATCHES)}')
  if m.moe.capacity_factor <= 0:
    raise _err('moe.capacity_factor', m.moe.capacity_factor, 'must be > 0')
  if m.moe.ffn_size < 1:
    raise _err('moe.ffn_size', m.moe.ffn_size, 'must be >= 1')
  grouped_matmul.check_config(m)


def _check(cond, field, value, rule):
  if not cond:
    raise ValueError(f'config.{field}={value!r}: {rule}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Validates a whole training config before anything compiles or writes."""
  for section in ('model', 'train', 'optimizer', 'checkpoint', 'mesh', 'data'):
    if section not in config:
      raise ValueError(f'config.{section} is missing')
  validate_model(config.model)
  t, o, c = config.train, config.optimizer, config.checkpoint
  for f in ('num_steps', 'batch_size', 'seq_len', 'log_every', 'grad_accum'):
    _check(isinstance(t[f], int) and t[f] >= 1, f'train.{f}', t[f], 'must be a positive integer')
  for f in ('eval_every', 'eval_steps', 'sample_tokens'):
    _check(isinstance(t[f], int) and t[f] >= 0, f'train.{f}', t[f], 'must be an integer >= 0')
  _check(t.seq_len <= config.model.max_seq_len, 'train.seq_len', t.seq_len,
         f'longer than the rotary range config.model.max_seq_len={config.model.max_seq_len}')
  # The length the blocks tile ('auto' runs XLA's attention where they do not: resolve_backend).
  if config.model.attention_backend == 'splash':
    attention.splash_block_sizes(config.model.splash, t.seq_len)
  _check(t.batch_size % t.grad_accum == 0, 'train.grad_accum', t.grad_accum,
         f'must divide train.batch_size={t.batch_size}')
  _check(
      isinstance(t.data_shards, int) and t.data_shards >= 0, 'train.data_shards', t.data_shards,
      'must be an integer >= 0 (0: one per process)')
  _check(t.data_shards == 0 or t.batch_size % t.data_shards == 0, 'train.data_shards',
         t.data_shards, f'must divide train.batch_size={t.batch_size}')
  step_guard.check_config(t)
  _check(0.0 <= t.collapse_top_k_share <= 1.0, 'train.collapse_top_k_share', t.collapse_top_k_share,
         'must be in [0, 1]')
  _check(o.lr > 0, 'optimizer.lr', o.lr, 'must be > 0')
  _check(0.0 <= o.min_lr_ratio <= 1.0, 'optimizer.min_lr_ratio', o.min_lr_ratio,
         'must be in [0, 1]')
  _check(o.warmup_steps >= 0, 'optimizer.warmup_steps', o.warmup_steps, 'must be >= 0')
  for f in ('b1', 'b2'):
    _check(0.0 <= o[f] < 1.0, f'optimizer.{f}', o[f], 'must be in [0, 1)')
  _check(o.clip_norm > 0, 'optimizer.clip_norm', o.clip_norm, 'must be > 0')
  _check(o.weight_decay >= 0, 'optimizer.weight_decay', o.weight_decay, 'must be >= 0')
  _check(c.every >= 1, 'checkpoint.every', c.every, 'must be >= 1')
  _check(c.keep >= 1, 'checkpoint.keep', c.keep, 'must be >= 1')
  for f in ('fim_rate', 'fim_spm_rate'):
    _check(0.0 <= config.data[f] <= 1.0, f'data.{f}', config.data[f], 'must be in [0, 1]')


def validate_against_mesh(config: ml_collections.ConfigDict, mesh) -> None:
  """Rules that need the device mesh (cheap to build; still before any compile)."""
  from yuanjax import sharding
  import jax
  dp = sharding.data_parallel_size(mesh)
  t = config.train
  _check((t.batch_size // t.grad_accum) % dp == 0, 'train.batch_size', t.batch_size,
         f'per micro-batch ({t.batch_size // t.grad_accum}) must be divisible by the data-parallel '
         f'size data*fsdp*expert={dp}')
  _check(t.batch_size % jax.process_count() == 0, 'train.batch_size', t.batch_size,
         f'must be divisible by the number of processes ({jax.process_count()})')
  _check(t.data_shards % jax.process_count() == 0, 'train.data_shards', t.data_shards,
         f'must be 0 or a multiple of the number of processes ({jax.process_count()})')
  validate_model_against_mesh(config.model, mesh)


def validate_model_against_mesh(m: ml_collections.ConfigDict, mesh) -> None:
  """config.model's sizes that the mesh splits (experts, ffn, heads) divide by its axes."""
  if m.moe_every:
    _check(m.num_experts % mesh.shape['expert'] == 0, 'model.num_experts', m.num_experts,
           f"must be divisible by config.mesh.expert={mesh.shape['expert']}")
    _check(m.moe.ffn_size % mesh.shape['tensor'] == 0, 'model.moe.ffn_size', m.moe.ffn_size,
           f"must be divisible by config.mesh.tensor={mesh.shape['tensor']} (experts' ffn split)")
  _check(m.num_heads % mesh.shape['tensor'] == 0, 'model.num_heads', m.num_heads,
         f"must be divisible by config.mesh.tensor={mesh.shape['tensor']}")
  G = attention.num_kv_heads(m)
  _check(G % mesh.shape['tensor'] == 0, 'model.num_kv_heads', G,
         f"must be divisible by config.mesh.tensor={mesh.shape['tensor']}")
  _check(m.vocab_size % mesh.shape['tensor'] == 0, 'model.vocab_size', m.vocab_size,
         f"must be divisible by config.mesh.tensor={mesh.shape['tensor']} (the embedding's split)")


def base_config() -> ml_collections.ConfigDict:
  """Everything but the model, with Yuan2.0-M32's optimizer settings as defaults."""
  from yuanjax import sharding
  from yuanjax.data import pipeline
  return ml_collections.ConfigDict(
      dict(
          train=dict(
              num_steps=1000,
              batch_size=8,
              seq_len=128,
              grad_accum=1,
              seed=0,
              data_shards=0,  # input streams making up the batch; 0: one per process
              # fine-tune: a workdir (DIR or DIR@STEP), a converted or an HF dir whose params
              # start the run (yuanjax.finetune); None: random init
              init_from=config_dict.placeholder(str),
              log_every=10,
              eval_every=0,
              eval_steps=8,
              sample_tokens=32,
              sample_prompt='def ',
              progress=True,
              collapse_top_k_share=0.9,  # flag a layer whose k busiest experts take > 90%
              **step_guard.defaults().to_dict()),  # on_nonfinite='halt', skip_spikes=False, ...
          optimizer=dict(lr=1e-4, min_lr_ratio=0.1, warmup_steps=100, b1=0.9, b2=0.95, eps=1e-8,
                         weight_decay=0.1, clip_norm=1.0),
          checkpoint=dict(every=500, keep=3, async_save=True),
          # What runs every train.eval_every steps and at the end (yuanjax.evals.in_training):
          # run 'loss' and/or TASK:LIMIT, comma-separated; data TASK=PATH, comma-separated.
          evals=dict(run='loss', data='', batch_size=8),
          mesh=sharding.mesh_config(),
          data=pipeline.data_config(),
      ))


def m32_pretraining() -> ml_collections.ConfigDict:
  """Yuan2.0-M32 pre-training as released (configs/yuan_m32.py, notebook 04): seq 4096, global
  batch 1536, lr 1e-4 -> 1e-5 cosine after 6400 warm-up steps, FIM 0.5 / SPM 0.5."""
  config = base_config()
  config.model = m32_model()
  config.train.update(
      dict(num_steps=300_000, batch_size=1536, seq_len=4096, log_every=50, eval_every=5000,
           eval_steps=32, sample_tokens=64))
  config.optimizer.update(dict(lr=1e-4, min_lr_ratio=0.1, warmup_steps=6400))
  config.checkpoint.update(dict(every=1000, keep=3))
  config.data.update(dict(fim_rate=0.5, fim_spm_rate=0.5))
  return config
