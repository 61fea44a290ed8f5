"""The 8-device side of `test_generate_mesh.py`, in a process of its own (XLA_FLAGS is set here,
before JAX starts): loads the workdir checkpoint straight onto each mesh, generates greedily,
and prints one JSON line: per mesh the tokens and the shardings of a param, of an expert param
and of the decode cache; and the errors of meshes refused before loading.

  python tests/multidevice/generate_worker.py WORKDIR
"""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.multidevice import generate_cases as cases  # pylint: disable=wrong-import-position
from yuanjax import generate as gen  # pylint: disable=wrong-import-position
from yuanjax import loader  # pylint: disable=wrong-import-position
from yuanjax.model import Transformer  # pylint: disable=wrong-import-position
from yuanjax.model.transformer import cache_axes  # pylint: disable=wrong-import-position


def spec(a) -> list:
  """The PartitionSpec of an array, or of a sharding, as JSON."""
  sharding = getattr(a, 'sharding', a)
  return [list(x) if isinstance(x, tuple) else x for x in sharding.spec]


def on_mesh(path: str, text: str) -> dict:
  mesh = gen.mesh_for(path, text)
  place = gen.Placement(mesh)
  m, params = loader.load(path, shardings=lambda m: gen.param_shardings(m, place))
  tokens = gen.generate(Transformer(m), params, cases.PROMPTS, max_new_tokens=cases.NEW, mesh=mesh)
  with place.context():  # as generate traces it: the cache takes its constraint's shardings
    cache = jax.jit(lambda: gen.decode_cache(Transformer(gen.generation_config(m)), 8, 32))()
  asked = place.tree(cache_axes(cache))  # what the constraint asks for, by the rules
  for a, want in zip(jax.tree.leaves(cache), jax.tree.leaves(asked)):
    if not a.sharding.is_equivalent_to(want, a.ndim):  # jit drops size-1 axes from the spec
      raise SystemExit(f'cache leaf sharded {a.sharding}, asked for {want}')
  attention = asked['blocks']['layer_0']['attention']
  k = cache['blocks']['layer_0']['attention']['k']
  blocks = params['blocks']['layer_0']
  return dict(tokens=tokens, embedding=spec(params['embedding']),
              wq=spec(blocks['attention']['wq']), w1=spec(blocks['moe']['w1']),
              k=spec(attention['k']), k_shard=list(k.addressable_shards[0].data.shape),
              u_prev=spec(attention['lf']['u_prev']))


def refused(path: str, text: str) -> str:
  try:
    gen.mesh_for(path, text)
  except ValueError as e:
    return str(e)
  return ''


def main(path: str) -> None:
  if jax.device_count() != 8:
    raise SystemExit(f'expected 8 devices, have {jax.device_count()}')
  out = {text: on_mesh(path, text) for text in cases.MESHES}
  out['refused'] = {text: refused(path, text) for text in cases.REFUSED}
  print(json.dumps(out))


if __name__ == '__main__':
  main(sys.argv[1])
