"""Grouped matmuls for the `dropless` MoE dispatch: `config.model.moe.grouped_matmul`.

A grouped matmul multiplies rows [s_g, s_g + n_g) of xs_MxK by w_GxKxN[g], for the group sizes
n_G (rows sorted by group). Rows past sum(n_G) belong to no group: their result is zero, and so
is their gradient, whatever the kernel leaves there.

  ragged_dot  `jax.lax.ragged_dot` (default): any backend. XLA lowers it to a zero-padded
              batched dot on GPU (slow, see docs/model.md, MoE dispatch).
  megablox    `jax.experimental.pallas.ops.tpu.megablox.gmm`, the Pallas TPU kernel MaxText
              uses. On any backend other than TPU it runs in Pallas interpret mode (chosen
              automatically): correct but slow, for tests only.
  tokamax     `tokamax.ragged_dot` (optional extra: `pip install 'yuanjax[tokamax]'`): its
              Mosaic GPU kernel on H100-class GPUs, its XLA reference on the CPU.

Megablox constraints, and what is done about them:
  - dtypes float32 or bfloat16 only: `config_lib.validate_model` refuses float16.
  - rows M must be a multiple of the row tile tm: rows are padded up to it (zero rows, in no
    group); tm is clamped to M rounded up to 16 (one tile when M is small).
  - the TPU's native tiles: tm a multiple of 16 (bfloat16 packs 16 rows), tk and tn multiples
    of 128 (`megablox_tiling`, validated); tk and tn are clamped to K and N (a block may span
    a whole dimension), and K, N that are not multiples of the tile are masked by the kernel.
  - group sizes int32, summing to at most M: the dispatch's counts are.
  - rows past the groups are left uninitialised by the kernel (NaN in interpret mode): masked.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from absl import flags, logging

GROUPED_MATMULS = ('ragged_dot', 'megablox', 'tokamax')
DEFAULT_MEGABLOX_TILING = (128, 128, 128)
MEGABLOX_DTYPES = ('float32', 'bfloat16')
_ROW_ALIGN = 16  # tm granularity: bfloat16's native TPU tile is 16 x 128
_LANE = 128  # tk, tn granularity: the TPU lane width


def import_tokamax():
  """The tokamax module, or an ImportError naming the field and the extra.

  tokamax reads its options from absl flags and, when nothing has parsed them, parses
  sys.argv itself (which fails on any other program's arguments: pytest's, a benchmark's);
  so unparsed flags are marked parsed here: their defaults. `absl.app.run` parses again.
  """
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("config.model.moe.grouped_matmul='tokamax' needs the optional package "
                      f"tokamax: pip install 'yuanjax[tokamax]' ({e})") from e
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return tokamax


def check_config(m) -> None:
  """Raises ValueError (ImportError for a missing extra) naming the field; `m` is config.model."""
  kind = m.moe.grouped_matmul
  if kind not in GROUPED_MATMULS:
    raise ValueError(f'config.model.moe.grouped_matmul={kind!r}: expected one of {GROUPED_MATMULS}')
  if kind == 'tokamax':
    import_tokamax()
  if kind != 'megablox':
    return
  if m.dtype not in MEGABLOX_DTYPES:
    raise ValueError(f'config.model.dtype={m.dtype!r}: '
                     f"moe.grouped_matmul='megablox' takes only {MEGABLOX_DTYPES}")
  tiling = tuple(m.moe.megablox_tiling)
  if (len(tiling) != 3 or not all(isinstance(t, int) and t > 0 for t in tiling) or
      tiling[0] % _ROW_ALIGN or tiling[1] % _LANE or tiling[2] % _LANE):
    raise ValueError(f'config.model.moe.megablox_tiling={tiling!r}: expected (tm, tk, tn), '
                     f'positive ints, tm a multiple of {_ROW_ALIGN}, tk and tn of {_LANE}')


@dataclasses.dataclass(frozen=True)
class GroupedMatmul:
  """`kind` (one of GROUPED_MATMULS) and megablox's (tm, tk, tn) tiling."""
  kind: str = 'ragged_dot'
  tiling: tuple[int, int, int] = DEFAULT_MEGABLOX_TILING

  @classmethod
  def from_config(cls, moe_config) -> GroupedMatmul:
    """From config.model.moe."""
    return cls(moe_config.grouped_matmul, tuple(moe_config.megablox_tiling))

  def __call__(self, xs_MxK, w_GxKxN, group_sizes_G):
    """[M, N] in xs's dtype; rows past sum(group_sizes_G) are zero."""
    if self.kind == 'ragged_dot':
      return jax.lax.ragged_dot(xs_MxK, w_GxKxN, group_sizes_G)
    if self.kind == 'megablox':
      return _masked(_megablox, xs_MxK, w_GxKxN, group_sizes_G, self.tiling)
    if self.kind == 'tokamax':
      return _masked(import_tokamax().ragged_dot, xs_MxK, w_GxKxN, group_sizes_G)
    raise ValueError(f'config.model.moe.grouped_matmul={self.kind!r}: '
                     f'expected one of {GROUPED_MATMULS}')


RAGGED_DOT = GroupedMatmul()


def _masked(kernel, xs_MxK, w_GxKxN, group_sizes_G, *args):
  """`kernel` with rows past the groups zeroed on the way in and out. The `where` on the input
  also zeroes those rows' gradient (a select, so NaN left there by the kernel does not leak)."""
  group_sizes_G = group_sizes_G.astype(jnp.int32)
  in_M = jnp.arange(xs_MxK.shape[0]) < jnp.sum(group_sizes_G)
  xs_MxK = jnp.where(in_M[:, None], xs_MxK, 0)
  return jnp.where(in_M[:, None], kernel(xs_MxK, w_GxKxN, group_sizes_G, *args), 0)


def megablox_tiles(M: int, K: int, N: int, tiling) -> tuple[int, int, int]:
  """The (tm, tk, tn) used for an [M, K] x [G, K, N] problem (see the module docstring)."""
  tm, tk, tn = tiling
  return min(tm, -(-M // _ROW_ALIGN) * _ROW_ALIGN), min(tk, K), min(tn, N)


def _megablox(xs_MxK, w_GxKxN, group_sizes_G, tiling):
  from jax.experimental.pallas.ops.tpu.megablox import gmm  # pylint: disable=g-import-not-at-top
  M, K = xs_MxK.shape
  tm, tk, tn = megablox_tiles(M, K, w_GxKxN.shape[2], tiling)
  xs_PxK = jnp.pad(xs_MxK, ((0, -M % tm), (0, 0)))  # whole row tiles; pad rows in no group
  interpret = jax.default_backend() != 'tpu'
  if interpret:
    _say_interpret(jax.default_backend())
  ys_PxN = gmm(xs_PxK, w_GxKxN, group_sizes_G, xs_MxK.dtype, (tm, tk, tn), interpret=interpret)
  return ys_PxN[:M]


@functools.cache
def _say_interpret(backend: str) -> None:
  logging.warning(
      "moe.grouped_matmul='megablox' on %s: Pallas interpret mode (a TPU kernel; "
      'correct but slow: use it for tests)', backend)
