"""The Hugging Face model types yuanjax maps, chosen here and nowhere else.

  yuan     hf_mapping.py       YuanForCausalLM (Yuan2.0-M32): LFA, attention router, tied lm_head
  mixtral  mixtral_mapping.py  MixtralForCausalLM: standard GQA attention, linear router, lm_head

Each mapping module has MODEL_TYPE, TIED_LM_HEAD (lm_head.weight optional and equal to the
embedding), model_config_from_hf, hf_config_from_model, exportable, tensor_groups, hf_shapes
and leaf_shapes. An import picks it by config.json's `model_type`, an export by the model
(`attention_type`: 'lfa' is Yuan, 'standard' Mixtral). `check_against_model`: the mapping's
params are exactly the model's.
"""
from __future__ import annotations

import types

import jax
import ml_collections

from yuanjax import train_state
from yuanjax.interop import hf_mapping, mixtral_mapping
from yuanjax.interop.hf_mapping import HFConfigError

MAPPINGS = {m.MODEL_TYPE: m for m in (hf_mapping, mixtral_mapping)}
_BY_ATTENTION = {'lfa': hf_mapping, 'standard': mixtral_mapping}


def for_hf_config(c: dict, src: str = '') -> types.ModuleType:
  """The mapping of an HF config.json dict; HFConfigError naming an unknown model_type."""
  model_type = c.get('model_type')
  if model_type not in MAPPINGS:
    raise HFConfigError(
        f'{src or "config.json"}: model_type={model_type!r} is not one yuanjax maps; known: '
        f'{", ".join(sorted(MAPPINGS))}; nothing was written')
  return MAPPINGS[model_type]


def for_model(m: ml_collections.ConfigDict) -> types.ModuleType:
  """The mapping of a yuanjax config.model (by its attention_type)."""
  kind = m.attention_type
  if kind not in _BY_ATTENTION:
    raise HFConfigError(f'config.model.attention_type={kind!r} has no HF format; known: '
                        f'{", ".join(sorted(_BY_ATTENTION))}')
  return _BY_ATTENTION[kind]


def check_against_model(m: ml_collections.ConfigDict) -> None:
  """The mapping must produce exactly the model's param tree (guards against model changes)."""
  model = {
      tuple(k.key for k in path): tuple(
          leaf.shape
      ) for path, leaf in jax.tree_util.tree_leaves_with_path(train_state.abstract_params(m))
  }
  ours = for_model(m).leaf_shapes(m)
  only_model = sorted(set(model.items()) - set(ours.items()))
  only_ours = sorted(set(ours.items()) - set(model.items()))
  if only_model or only_ours:
    fmt = lambda items: ', '.join(f'{"/".join(p)} {list(s)}' for p, s in items) or 'none'
    raise AssertionError(
        f'the HF mapping and Transformer(config.model) params disagree: only in the '
        f'model: {fmt(only_model)}; only in the mapping: {fmt(only_ours)}')
