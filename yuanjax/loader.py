"""A checkpoint loaded for use: (config.model, params) of whatever PATH holds.

PATH is one of
  an HF dir          config.json with a model_type (Yuan, Mixtral): converted in memory
                     (yuanjax.interop.hf); with shardings, group by group, each leaf placed
                     on its sharding (in the source dtype, cast there) before the next is
                     built; without, the whole model in param_dtype on the host first
  a converted dir    what `python -m yuanjax.convert from-hf` writes (yuanjax.interop.converted):
                     restored one param at a time, straight into shardings when given
  a training workdir checkpoints/ (yuanjax.checkpoint): the newest readable checkpoint (an
                     unreadable newest one falls back to the previous), or that of `step`

Python::

    from yuanjax import loader
    m, params = loader.load(path)                       # config.model, params (jax.Arrays)
    m, params = loader.load(path, shardings=fn)         # fn(config.model): the params' target
                                                        # shardings; restored into them
    m, params = loader.load(path, quantize='int8')      # int8 matmul weights (yuanjax.quantize)
    m = loader.model_config(path)                       # config.model alone, no weight read
    model, params = loader.load_model(path)             # a Transformer
    model, params, tok = loader.load_checkpoint(path)   # and its tokenizer
    tok = loader.load_tokenizer(path)                   # of an HF, converted or tokenizer dir

Every saved config.model comes back through `config_lib.upgrade` (fields added since it was
saved get the behaviour they had). `overrides` (dotted config.model fields, e.g.
{'dtype': 'float32', 'moe.dispatch': 'dense'}) apply after it. HF and converted dirs compute in
the checkpoint's own dtype (`torch_dtype` of its config.json; the source's for a converted
dir) unless overrides set 'dtype'. exact_hf_rope: the released HF Yuan runtime's bfloat16
rotary rounding (spec quirk 3: config.model.rope_hf_bf16), for agreement with it; an error
for an HF or converted Mixtral (its angles are float32). The default is exact float32.

Generation (yuanjax.generate), the notebooks and what comes next (fine-tuning's init_from with
its train state's shardings, evaluation) load through `load`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from yuanjax import checkpoint, config_lib, train_state
from yuanjax import quantize as quantize_lib
from yuanjax import workdir as workdir_lib
from yuanjax.interop import converted, hf, hf_mapping, mappings
from yuanjax.model import Transformer

Shardings = Callable[[ml_collections.ConfigDict], object]  # config.model -> a tree of Sharding


def _abstract(m: ml_collections.ConfigDict, shardings: Shardings | None):
  """The unboxed abstract params of config.model, carrying the target shardings if given."""
  abstract = train_state.abstract_params(m)
  if shardings is None:
    return abstract
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                      shardings(m))


def _placed(params, m: ml_collections.ConfigDict, shardings: Shardings | None, quantize: str):
  """Params as jax.Arrays in param_dtype, on the default device or in the target shardings;
  quantize 'int8': matmul weights int8 (yuanjax.quantize), from the host leaves when
  unsharded (no float copy on the device), else each float weight replaced where it lies."""
  pdtype = jnp.dtype(m.param_dtype)
  if shardings is None:
    if quantize != 'none':
      return quantize_lib.quantize_params(params, m, quantize)
    return jax.tree.map(lambda a: jnp.asarray(a, pdtype), params)
  place = lambda a, s: jax.device_put(a if isinstance(a, jax.Array) else np.asarray(a, pdtype), s)
  placed = jax.tree.map(place, params, shardings(m))
  return quantize_lib.quantize_params(placed, m, quantize, donate=True)


def _workdir(path: str, overrides: Mapping, step: int | None, shardings: Shardings | None):
  """(the whole config, params) of a training workdir's checkpoint."""

  def config_of(meta):
    config = ml_collections.ConfigDict(json.loads(meta['config']))
    config.model = config_lib.upgrade(config.model)
    config_lib.override(config.model, overrides, 'config.model')
    return config

  abstract = lambda meta: _abstract(config_of(meta).model, shardings)
  _, params, meta = checkpoint.restore_params(path, abstract, step)
  return config_of(meta), params


def _mapping_of_dir(path: str):
  """The mapping module of an HF dir (its model_type) or a converted dir (its model)."""
  if converted.is_converted(path):
    return mappings.for_model(converted.read(path)[0])
  return mappings.for_hf_config(hf.read_hf_config(path), os.path.join(path, 'config.json'))


def _dir_model(path: str) -> ml_collections.ConfigDict:
  """config.model of an HF or a converted dir (no weight read), computing in the source's
  dtype (`torch_dtype` of its config.json)."""
  if converted.is_converted(path):
    converted.require_current_format(path)
    m, record = converted.read(path)
    hf_cfg = record.get('config', {})
  else:
    hf_cfg = hf.read_hf_config(path)
    m = hf.model_config_from_hf(hf_cfg, os.path.join(path, 'config.json'))
  source_dtype = hf_cfg.get('torch_dtype', hf_cfg.get('dtype'))  # 'dtype': transformers >= 5
  if source_dtype in hf.SUPPORTED_DTYPES:
    m.dtype = source_dtype
  return m


def _hf_dir(path: str, overrides: Mapping, exact_hf_rope: bool, shardings: Shardings | None):
  """(config.model, params) of an HF or a converted dir."""
  if exact_hf_rope and _mapping_of_dir(path) is not hf_mapping:  # before reading any weight
    raise ValueError(f'{path}: exact_hf_rope reproduces the HF Yuan runtime\'s bfloat16 rotary '
                     'angles (spec quirk 3); HF Mixtral computes its angles in float32')
  m = _dir_model(path)
  config_lib.override(m, overrides, 'config.model')
  if exact_hf_rope:
    m.rope_hf_bf16 = True
  config_lib.validate_model(m)
  mappings.check_against_model(m)
  if converted.is_converted(path):
    return m, converted.restore_params(path, _abstract(m, shardings))
  if shardings is None:
    return m, hf.params_from_hf(path)[1]
  targets, pdtype = shardings(m), jnp.dtype(m.param_dtype)

  def place(leaf, a):
    placed = jax.device_put(a, converted.get(targets, leaf))
    return placed if placed.dtype == pdtype else placed.astype(pdtype)

  return m, hf.params_from_hf(path, place, pdtype)[1]


def _resolve(path, overrides, exact_hf_rope: bool, step: int | None, shardings, quantize: str):
  """(config.model, params, the workdir's whole config or None for an HF/converted dir)."""
  quantize_lib.check_mode(quantize)  # before any read
  path = os.fspath(path)
  overrides = dict(overrides or {})
  if os.path.isfile(os.path.join(path, 'config.json')):
    if step is not None:
      raise ValueError(f'{path}: step={step} is only for training workdirs (one checkpoint here)')
    m, params = _hf_dir(path, overrides, exact_hf_rope, shardings)
    return m, _placed(params, m, shardings, quantize), None
  if checkpoint.has_checkpoints(path):
    if exact_hf_rope:
      overrides['rope_hf_bf16'] = True
    config, params = _workdir(path, overrides, step, shardings)
    return config.model, _placed(params, config.model, shardings, quantize), config
  raise FileNotFoundError(f'{path}: neither an HF/converted checkpoint dir (config.json) nor a '
                          'training workdir (checkpoints/)')


def model_config(path, *, step: int | None = None) -> ml_collections.ConfigDict:
  """config.model of an HF dir, a converted dir or a training workdir (its newest checkpoint's,
  or that of `step`), as `load` gives it without overrides; no weight is read."""
  path = os.fspath(path)
  if os.path.isfile(os.path.join(path, 'config.json')):
    if step is not None:
      raise ValueError(f'{path}: step={step} is only for training workdirs (one checkpoint here)')
    return _dir_model(path)
  steps = workdir_lib.checkpoint_steps(path)
  if not steps:
    raise FileNotFoundError(f'{path}: neither an HF/converted checkpoint dir (config.json) nor a '
                            'training workdir with checkpoints')
  if step is not None and step not in steps:
    raise FileNotFoundError(f'{path}: no checkpoint of step {step} (there are {steps})')
  meta = checkpoint.read_meta(path, steps[-1] if step is None else step)
  return config_lib.upgrade(json.loads(meta['config'])['model'])


def load(path, *, overrides: Mapping[str, object] | None = None, exact_hf_rope: bool = False,
         step: int | None = None, shardings: Shardings | None = None, quantize: str = 'none'):
  """(config.model, params) of an HF dir, a converted dir or a training workdir.

  step: for a workdir, that checkpoint instead of the newest (an error for other dirs).
  shardings: config.model -> a tree of jax.sharding.Sharding matching the unboxed params; the
  params are then restored straight into them (converted dirs and workdirs) or placed so.
  quantize: 'none' or 'int8' (yuanjax.quantize: int8 matmul weights with per-channel scales,
  which the model dequantizes where it uses them); another value is a ValueError naming it,
  before anything is read.
  """
  return _resolve(path, overrides, exact_hf_rope, step, shardings, quantize)[:2]


def load_model(path, *, overrides: Mapping[str, object] | None = None, exact_hf_rope: bool = False,
               step: int | None = None, quantize: str = 'none', shardings: Shardings | None = None):
  """(Transformer, params) of an HF dir, a converted dir or a training workdir (`load`)."""
  m, params = load(path, overrides=overrides, exact_hf_rope=exact_hf_rope, step=step,
                   quantize=quantize, shardings=shardings)
  return Transformer(m), params


# tokenizer_class values of a tokenizer-only dir that name a SentencePiece tokenizer.model.
SENTENCEPIECE_TOKENIZERS = (None, 'LlamaTokenizer', 'LlamaTokenizerFast', 'YuanTokenizer')


def _read_tokenizer_config(path: str) -> dict | None:
  """tokenizer_config.json of a dir (or of its hf_files/), special_tokens_map.json's entries
  over it (as HF reads them); None when there is none."""
  for d in (path, os.path.join(path, 'hf_files')):
    if os.path.isfile(os.path.join(d, 'tokenizer_config.json')):
      config = {}
      for name in ('tokenizer_config.json', 'special_tokens_map.json'):
        if os.path.isfile(os.path.join(d, name)):
          with open(os.path.join(d, name), encoding='utf-8') as f:
            config.update(json.load(f))
      return config
  return None


def _tokenizer_mapping(path: str, model_file: str, config: dict | None):
  """The mapping whose runtime's tokenizer conventions apply: config.json's model type, or for a
  tokenizer-only dir Yuan's when its eos is '<eod>' or its model has that piece, else Mixtral's
  (Llama's)."""
  if os.path.isfile(os.path.join(path, 'config.json')):
    return _mapping_of_dir(path)
  if config is None:
    raise FileNotFoundError(f'{path}: neither a checkpoint (config.json) nor a tokenizer dir '
                            '(tokenizer_config.json)')
  if config.get('tokenizer_class') not in SENTENCEPIECE_TOKENIZERS:
    raise ValueError(f'{path}/tokenizer_config.json: tokenizer_class='
                     f'{config["tokenizer_class"]!r}; yuanjax reads SentencePiece tokenizers '
                     f'({", ".join(map(str, SENTENCEPIECE_TOKENIZERS[1:]))})')
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from yuanjax.data import tokenizer  # pylint: disable=g-import-not-at-top
  sp = spm.SentencePieceProcessor(model_file=model_file)
  yuan = (tokenizer.hf_special_tokens(config)['eos_token'] == tokenizer.EOD or
          sp.id_to_piece(sp.piece_to_id(tokenizer.EOD)) == tokenizer.EOD)
  return mappings.MAPPINGS['yuan' if yuan else 'mixtral']


def load_tokenizer(path: str, model_file: str | None = None):
  """The tokenizer of an HF dir, a converted dir or a tokenizer-only dir (tokenizer.model and
  tokenizer_config.json, as Yuan2-M32-hf's tokenizer/), as the model's own runtime builds it
  (`tokenizer_options()` of its mapping, given the dir's tokenizer_config.json), from its
  tokenizer.model or `model_file`.

  Yuan: newlines as '<n>', HF's special tokens with eos '<eod>', then the added tokens
  (tokenizer.YUAN_ADDED_TOKENS: one that the model lacks gets the next id past it, in order;
  each, '<eod>' too, is encoded as one id).
  Mixtral: Llama's sentencepiece model as is, '<s>' first, '</s>' ends documents (eod_id).
  """
  from yuanjax.data import tokenizer  # pylint: disable=g-import-not-at-top  (optional here)
  candidates = [model_file] if model_file else [
      os.path.join(path, 'tokenizer.model'),
      os.path.join(path, 'hf_files', 'tokenizer.model')
  ]
  model = next((c for c in candidates if os.path.isfile(c)), None)
  if model is None:
    raise FileNotFoundError(f'{path}: no tokenizer.model (nor hf_files/tokenizer.model)'
                            if not model_file else f'{model_file}: no such file')
  config = _read_tokenizer_config(path)
  options = _tokenizer_mapping(path, model, config).tokenizer_options(config)
  return tokenizer.Tokenizer(model, **options)


def load_checkpoint(path, *, exact_hf_rope: bool = False, overrides: Mapping[str, object] |
                    None = None, tokenizer: str | None = None, step: int | None = None,
                    quantize: str = 'none', shardings: Shardings | None = None):
  """(Transformer, params, tokenizer) of an HF dir, a converted dir or a training workdir.

  tokenizer: a sentencepiece .model to use instead of the checkpoint's (for HF/converted dirs
  it is loaded with the model type's conventions: Yuan's '<n>' newlines, Mixtral's '<s>' and
  '</s>'; for workdirs as our trained ones are). Workdirs: the data config's tokenizer.
  quantize: as for `load`. shardings: as `load`'s (e.g. `yuanjax.generate.param_shardings` on a
  mesh).
  """
  from yuanjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from yuanjax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  m, params, config = _resolve(path, overrides, exact_hf_rope, step, shardings, quantize)
  if config is None:  # an HF or converted dir: its model's conventions (Yuan's, Mixtral's)
    tok = load_tokenizer(os.fspath(path), model_file=tokenizer)
  else:
    tok = Tokenizer(tokenizer) if tokenizer else pipeline.resolve_data(config.data)[1]
  return Transformer(m), params, tok
