"""config.train.init_from: a run that starts from another checkpoint's parameters (fine-tuning).

init_from names a training workdir (its newest readable checkpoint; `DIR@STEP` for that step's),
a converted dir (`python -m yuanjax.convert from-hf`) or a raw HF dir (Yuan2-M32-hf, Mixtral).
Only the parameters are taken, as Yuan's `--finetune --train-reset` does: a fresh optimizer
state, step 0, the learning-rate schedule from its start, a fresh data iterator.

The model is the source's (its saved config or config.json). config.model may differ from it
only in NON_ARCHITECTURAL fields (how the same function is computed or trained, and the rotary
range of a longer-context fine-tune, as Yuan's SFT does: 16K positions, base 40890); any other
difference, from the config file or a command-line override, is a ValueError naming the field,
raised before anything compiles (`resolve_model`). The parameters are read through
yuanjax.loader straight into the train state's shardings (`init_state`).

Once the run has saved a checkpoint of its own, a restart resumes from that one and init_from is
ignored (the trainer logs it), so a preempted fine-tune resumes exactly.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from yuanjax import config_lib, loader, train_state

# config.model fields a fine-tune may set differently from its source.
NON_ARCHITECTURAL = (
    'dtype',
    'param_dtype',
    'attention_backend',
    'attention_query_blocks',
    'remat',
    'scan_unroll',
    'loss_chunk_len',
    'loss_unroll',
    'init_std',
    'rope_hf_bf16',
    'max_seq_len',
    'rope_ntk_factor',
    'router.jitter_eps',
    'router.noisy_topk',
    'router.load_balance_weight',
    'router.z_loss_weight',
    'moe.dispatch',
    'moe.capacity_factor',
    'moe.grouped_matmul',
    'moe.megablox_tiling',
    'splash',  # the splash attention kernel's tiles (every splash.* field)
)


def _non_architectural(field: str) -> bool:
  return any(field == f or field.startswith(f + '.') for f in NON_ARCHITECTURAL)


def parse(init_from: str) -> tuple[str, int | None]:
  """(path, step or None) of `DIR` or `DIR@STEP`."""
  path, sep, step = init_from.rpartition('@')
  if sep and step.isdigit() and not os.path.exists(init_from):
    return path, int(step)
  return init_from, None


def _get(m: ml_collections.ConfigDict, field: str):
  node = m
  for k in field.split('.'):
    node = node[k]
  return node


def _flat(m: ml_collections.ConfigDict, prefix: str = '') -> dict:
  out = {}
  for k, v in m.items():
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _same(a, b) -> bool:
  return a == b or (isinstance(a,
                               (list, tuple)) and isinstance(b,
                                                             (list, tuple)) and list(a) == list(b))


def source_model(init_from: str) -> ml_collections.ConfigDict:
  """config.model of the init_from source (no weight read); errors name config.train.init_from."""
  path, step = parse(init_from)
  try:
    return loader.model_config(path, step=step)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise ValueError(f'config.train.init_from={init_from!r}: {e}') from e


def resolve_model(config: ml_collections.ConfigDict) -> None:
  """Sets config.model to the source's with config.model's NON_ARCHITECTURAL fields; any other
  field that differs is a ValueError naming it and both values."""
  init_from = config.train.init_from
  source = source_model(init_from)
  mine, theirs = _flat(config.model), _flat(source)
  for field in sorted(set(mine) | set(theirs)):
    if _non_architectural(field) or field in mine and field in theirs and _same(
        mine[field], theirs[field]):
      continue
    raise ValueError(
        f'config.model.{field}={mine.get(field, "<absent>")!r} but the model of '
        f'config.train.init_from={init_from!r} has {theirs.get(field, "<absent>")!r}: a '
        f'fine-tune keeps its source\'s architecture (only {", ".join(NON_ARCHITECTURAL)} may '
        'differ)')
  config_lib.override(source, _overrides(config.model), 'config.model')
  config.model = source


def _overrides(m: ml_collections.ConfigDict) -> dict:
  return {f: _get(m, f) for f in NON_ARCHITECTURAL}


def _source_tokenizer(init_from: str) -> str | None:
  """The tokenizer model file of the init_from source: an HF or converted dir's (None if it has
  none), a workdir's data tokenizer (as its saved config names it)."""
  path, step = parse(init_from)
  if not os.path.isfile(os.path.join(path, 'config.json')):
    from yuanjax import checkpoint, workdir  # pylint: disable=g-import-not-at-top
    from yuanjax.data import pipeline  # pylint: disable=g-import-not-at-top
    meta = checkpoint.read_meta(path, step or workdir.checkpoint_steps(path)[-1])
    data = ml_collections.ConfigDict(json.loads(meta['config'])['data'])
    return pipeline.resolve_data(data)[1].model_path
  for candidate in ('tokenizer.model', os.path.join('hf_files', 'tokenizer.model')):
    if os.path.isfile(os.path.join(path, candidate)):
      return os.path.join(path, candidate)
  return None


def check_tokenizer(config: ml_collections.ConfigDict, data_tokenizer) -> None:
  """The data must be tokenized with the source's tokenizer: a ValueError naming both (their
  files, sha256 and vocabulary sizes) when the files differ. A source without a tokenizer file
  (an HF dir holding weights only) is not checked."""
  source = _source_tokenizer(config.train.init_from)
  if source is None:
    logging.warning(
        'train.init_from=%s has no tokenizer.model: the data\'s tokenizer is not '
        'checked against it', config.train.init_from)
    return
  mine, theirs = (_fingerprint(p) for p in (data_tokenizer.model_path, source))
  if mine[0] != theirs[0]:
    raise ValueError(
        f'the data was tokenized with {data_tokenizer.model_path} (sha256 {mine[0][:16]}..., '
        f'{mine[1]} pieces) but config.train.init_from={config.train.init_from!r} uses {source} '
        f'(sha256 {theirs[0][:16]}..., {theirs[1]} pieces): prepare the data with the '
        'source\'s tokenizer')


def _fingerprint(path: str) -> tuple[str, int]:
  """(sha256 of a tokenizer model file, its SentencePiece pieces; a file it cannot read: 0)."""
  from yuanjax.data import prepare  # pylint: disable=g-import-not-at-top
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  try:
    pieces = spm.SentencePieceProcessor(model_file=path).get_piece_size()
  except (OSError, RuntimeError):
    pieces = 0
  return prepare.tokenizer_fingerprint(path, pieces)['tokenizer_sha256'], pieces


def init_state(config: ml_collections.ConfigDict, built: train_state.Built):
  """The step-0 TrainState of the init_from source's params (read into the state's shardings)
  with a fresh optimizer state. config.model must have been through `resolve_model`."""
  path, step = parse(config.train.init_from)
  overrides = _overrides(config.model)
  _, params = loader.load(path, overrides=overrides, step=step,
                          shardings=lambda _: built.shardings.params)
  return jax.jit(built.init_with, out_shardings=built.shardings, donate_argnums=0)(params)


# ---------------------------------------------------------------- a local example


def reverse_task(seed: int = 0, held_out: int = 64) -> tuple[list, list]:
  """(train, held-out) samples of the synthetic instruction `reverse: abc` -> `cba`: every
  string of 3 or 4 letters of 'abcdef', shuffled; the held-out prompts are never trained on."""
  words = [''.join(w) for n in (3, 4) for w in itertools.product('abcdef', repeat=n)]
  words = [words[i] for i in np.random.default_rng(seed).permutation(len(words))]
  pairs = [(f'reverse: {w}', w[::-1]) for w in words]
  return pairs[held_out:], pairs[:held_out]


def _char_tokenizer(path: str, text: str, symbols=('<n>', '<eod>', '<sep>', '<pad>')) -> str:
  """A character-level sentencepiece model of `text` (with <unk> <s> </s>) and `symbols` (Yuan's
  `<n>`, `<eod>`, `<sep>`, `<pad>` by default)."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_prefix=path,
                                 model_type='char', vocab_size=len(set(text)) + 4,
                                 hard_vocab_limit=False, character_coverage=1.0,
                                 user_defined_symbols=list(symbols), minloglevel=2)
  return path + '.model'


def local_example(root: str, m: ml_collections.ConfigDict, seq_len: int,
                  chat_template: str = 'yuan2') -> tuple[str, str]:
  """(HF dir, SFT shards) under `root`, made once: model `m` (random, vocab 128) saved in the HF
  layout with a character tokenizer, and `reverse_task`'s training samples in Yuan's line
  format prepared for `seq_len` with `chat_template` (yuan2: the tokenizer has Yuan's symbols;
  mistral: only Llama's <unk> <s> </s>), the tokenizer read as the HF dir's model family's
  runtime reads it. For `:runlocal` fine-tunes and tests."""
  from yuanjax import publish  # pylint: disable=g-import-not-at-top
  from yuanjax.data import sft  # pylint: disable=g-import-not-at-top
  from yuanjax.interop import hf  # pylint: disable=g-import-not-at-top
  from yuanjax.model import Transformer  # pylint: disable=g-import-not-at-top

  def write(tmp):
    lines = [f'{p}<sep>{r}' for p, r in reverse_task()[0]]
    with open(os.path.join(tmp, 'sft.txt'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
    yuan = chat_template == 'yuan2'
    tok = _char_tokenizer(os.path.join(tmp, 'tokenizer'),
                          '\n'.join(lines + ([] if yuan else ['[INST] [/INST]'])),
                          ('<n>', '<eod>', '<sep>', '<pad>') if yuan else ())
    params = Transformer(m).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
    hf.save_hf(os.path.join(tmp, 'hf'), m, params, dtype='float32')
    shutil.copy(tok, os.path.join(tmp, 'hf', 'tokenizer.model'))
    sft.prepare_sft(loader.load_tokenizer(os.path.join(tmp, 'hf')), [os.path.join(tmp, 'sft.txt')],
                    os.path.join(tmp, 'shards'), seq_len=seq_len, chat_template_name=chat_template,
                    manifest_tokenizer='../tokenizer.model')

  if not os.path.isdir(root):
    publish.directory(root, write, keep_existing=True)  # another process may have made it
  return os.path.join(root, 'hf'), os.path.join(root, 'shards')
