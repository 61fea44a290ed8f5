"""The accelerator attention backends against the 'xla' reference, on the CPU.

'splash' runs the Pallas kernel in interpret mode: forward and gradients (params and input)
of the whole attention layer (LFA, head_dim 256, partial rotary 64 of 256, two query heads on
one key/value head) equal the reference in float32 and bfloat16, for a batch of one whole
document, several packed documents and a document followed by padding (segment 0), and
without segment ids. Blocks of 128 (the smallest splash takes) over 256 positions, so the
kernel skips and masks across blocks. 'cudnn' cannot run here: its arguments are checked and
it is run through XLA's implementation. Splash inside meshes: tests/multidevice.
"""
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.model.helpers import rel_err, tiny, tree_rel_err
from yuanjax.model import attention, layers

L = 256
SEGMENTS = np.array([[1] * L, [1] * 100 + [2] * 90 + [3] * 66, [1] * 200 + [0] * 56], np.int32)
TOL = {'float32': 1e-5, 'bfloat16': 2e-2}


def _cfg(backend, dtype='float32'):
  blocks = {f'splash.{b}': 128 for b in attention.SPLASH_BLOCKS}
  return tiny(attention_backend=backend, dtype=dtype, head_dim=256, rotary_dims=64, num_kv_heads=1,
              **blocks)


@functools.cache
def _loss_and_grads(backend, dtype, segments):
  """(output, d loss / d (params, input)) of one attention layer; `segments`: 'segments'
  (the three rows of SEGMENTS) or 'none' (no segment ids). Cached: one compile each."""
  x = jnp.asarray(np.random.RandomState(0).randn(len(SEGMENTS), L, 32), dtype)  # as blocks get
  seg = jnp.asarray(SEGMENTS) if segments == 'segments' else None
  pos = layers.positions_from_segments(jnp.ones_like(SEGMENTS) if seg is None else seg)
  mod = attention.Attention(_cfg(backend, dtype))
  v = attention.Attention(_cfg('xla')).init(jax.random.key(0), x, seg, pos)

  def loss(v, x):
    out = mod.apply(v, x, seg, pos).astype(jnp.float32)
    return jnp.sum(jnp.sin(out)), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(v, x)
  return out, grads


@pytest.mark.parametrize('dtype,segments', [('float32', 'segments'), ('bfloat16', 'segments'),
                                            ('float32', 'none')])
def test_splash_equals_xla_forward_and_gradients(dtype, segments):
  want_out, want_grads = _loss_and_grads('xla', dtype, segments)
  got_out, got_grads = _loss_and_grads('splash', dtype, segments)
  for row in range(len(SEGMENTS)):  # one document, packed, padded
    assert rel_err(got_out[row], want_out[row]) < TOL[dtype], row
  assert rel_err(got_grads[1], want_grads[1]) < TOL[dtype]  # d/d input
  assert tree_rel_err(got_grads[0], want_grads[0]) < TOL[dtype]  # d/d params


def test_splash_is_not_the_unmasked_attention():
  """The segment ids reach the kernel: packed rows differ from the same rows unsegmented."""
  out_seg, _ = _loss_and_grads('splash', 'float32', 'segments')
  out_none, _ = _loss_and_grads('splash', 'float32', 'none')
  assert rel_err(out_seg[0], out_none[0]) < 1e-6  # one document: the same
  assert rel_err(out_seg[1, 100:], out_none[1, 100:]) > 1e-2  # later documents: not


def test_cudnn_arguments_and_result(monkeypatch):
  """'cudnn' asks jax.nn.dot_product_attention for implementation='cudnn', causal, with the
  [B, 1, L, L] same-segment mask (none without segments); run through XLA's implementation it
  equals the reference forward and backward in bfloat16."""
  calls, original = [], jax.nn.dot_product_attention

  def xla_instead(q, k, v, mask=None, **kw):
    calls.append(dict(kw, mask=mask))
    return original(q, k, v, mask=mask, **{**kw, 'implementation': 'xla'})

  monkeypatch.setattr(jax.nn, 'dot_product_attention', xla_instead)
  want_out, want_grads = _loss_and_grads('xla', 'bfloat16', 'segments')
  got_out, got_grads = _loss_and_grads('cudnn', 'bfloat16', 'segments')
  assert rel_err(got_out, want_out) < TOL['bfloat16']
  assert tree_rel_err(got_grads, want_grads) < TOL['bfloat16']
  assert calls[0]['implementation'] == 'cudnn' and calls[0]['is_causal']
  assert calls[0]['scale'] == 256**-0.5 and calls[0]['mask'].shape == (len(SEGMENTS), 1, L, L)
  q = jnp.ones((len(SEGMENTS), L, 2, 8), jnp.bfloat16)  # outside jit: the mask's values
  for segments in (jnp.asarray(SEGMENTS), None):
    attention.fused_attention(q, q[:, :, :1], q[:, :, :1], segments, 0.5, 'cudnn')
  want_mask = (SEGMENTS[:, :, None] == SEGMENTS[:, None, :])[:, None]
  np.testing.assert_array_equal(np.asarray(calls[-2]['mask']), want_mask)
  assert calls[-1]['mask'] is None and calls[-1]['implementation'] == 'cudnn'


def test_auto_picks_by_platform_and_logs_once(caplog):
  caplog.set_level(logging.INFO)
  attention._log_choice.cache_clear()
  pick = lambda platform, dtype='bfloat16': attention.resolve_backend(_cfg('auto', dtype), L,
                                                                      platform)
  assert [pick('tpu'), pick('gpu'), pick('cpu')] == ['splash', 'cudnn', 'dot_product_attention']
  assert pick('gpu', 'float32') == 'dot_product_attention'  # cuDNN takes no float32
  assert attention.resolve_backend(_cfg('xla'), L, 'tpu') == 'xla'
  for _ in range(3):
    pick('tpu')
  assert [r.getMessage() for r in caplog.records
         ].count("attention_backend='auto' on tpu with bfloat16 compute: 'splash'") == 1


@pytest.mark.parametrize('length', [200, 64])  # not a multiple of 128; below one block
def test_auto_on_a_tpu_takes_xla_where_splash_cannot_tile_the_length(monkeypatch, caplog, length):
  """As MaxText's 'autoselected' below 128: 'auto' runs 'dot_product_attention' (and warns
  why) instead of failing in the trace; the layer's result is the reference's."""
  attention._log_choice.cache_clear()
  cfg = _cfg('auto')
  assert attention.resolve_backend(cfg, length, 'tpu') == 'dot_product_attention'
  assert f'splash needs a sequence length ({length})' in caplog.records[-1].getMessage()
  assert caplog.records[-1].levelno == logging.WARNING
  q, k, v = (jnp.asarray(np.random.RandomState(i).randn(2, length, H, 256), jnp.float32)
             for i, H in enumerate((2, 1, 1)))
  want = attention.causal_attention(q, k, v, None, _cfg('xla'))
  monkeypatch.setattr(jax, 'default_backend', lambda: 'tpu')  # a TPU's resolution on this CPU
  assert rel_err(attention.causal_attention(q, k, v, None, cfg), want) < 1e-5


class _KernelBuilt(Exception):
  pass


@pytest.mark.parametrize('platform, interpret', [('cpu', True), ('tpu', False), ('gpu', None)])
def test_splash_interpret_mode_only_on_the_cpu(monkeypatch, platform, interpret):
  """An explicit 'splash' builds its kernel in interpret mode on the CPU, compiled on a TPU,
  and elsewhere raises naming the field before any kernel is built."""
  built = []

  def kernel(seq_len, heads, blocks, interpret):
    built.append(interpret)
    raise _KernelBuilt

  q = jnp.ones((1, L, 2, 256), jnp.float32)
  monkeypatch.setattr(attention, '_splash_kernel', kernel)
  monkeypatch.setattr(jax, 'default_backend', lambda: platform)
  run = lambda: attention.causal_attention(q, q[:, :, :1], q[:, :, :1], None, _cfg('splash'))
  if interpret is None:
    with pytest.raises(ValueError, match=r"config\.model\.attention_backend='splash'.* gpu"):
      run()
  else:
    with pytest.raises(_KernelBuilt):
      run()
  assert built == ([] if interpret is None else [interpret])


def test_splash_blocks_name_the_field():
  blocks = {b: 128 for b in attention.SPLASH_BLOCKS}
  assert attention.splash_block_sizes({**blocks, 'block_q': 512}, 256)['block_q'] == 256
  for bad, length, field in (({
      'block_kv': 100
  }, None, 'block_kv'), ({
      'block_q_dq': 0
  }, None, 'block_q_dq'), ({
      'block_kv': 256
  }, 384, 'block_kv'), ({}, 200, 'block_q'), ({
      'block_kv_compute': 256,
      'block_kv': 384
  }, None, 'block_kv_compute')):
    with pytest.raises(ValueError, match=rf'config\.model\.splash\.{field}='):
      attention.splash_block_sizes({**blocks, **bad}, length)
