"""lm-evaluation-harness (lm-eval 0.4.x) on a yuanjax checkpoint: the registered model `yuanjax`.

Command line: lm-eval's own, run by this module once it has registered `yuanjax` (the
`lm_eval` script alone cannot find it: lm-eval 0.4.13 looks models up in its own registry
only, with no plugin entry point)::

    python -m yuanjax.evals.lm_eval_model --model yuanjax \\
        --model_args checkpoint=PATH,batch_size=8 --tasks arc_challenge,hellaswag \\
        [--limit N] [--num_fewshot K] [--include_path DIR] [--output_path DIR] [--log_samples]

Python::

    import lm_eval
    from yuanjax.evals import lm_eval_model  # registers 'yuanjax'
    lm_eval.simple_evaluate(model='yuanjax', model_args={'checkpoint': PATH, 'batch_size': 8},
                            tasks=['arc_challenge'])

model_args: checkpoint (an HF dir, a converted dir or a training workdir: yuanjax.loader),
batch_size (rows per forward and per generation; model_args win over `--batch_size`),
max_length (tokens a forward sees; default config.model.max_seq_len), max_gen_toks (default
256; a task's own setting wins), step (a workdir's checkpoint), dtype, tokenizer (a
sentencepiece .model instead of the checkpoint's), seed (sampling), quantize ('none' or
'int8': int8 weights with per-channel scales, yuanjax.quantize), mesh (a device mesh as
yuanjax.generate's --mesh, its axes joined by '/' since commas separate model_args:
mesh=data=2/expert=4; checked against the checkpoint before any weight is read): the
checkpoint is loaded straight onto it, the forwards and generate run there, a forward's batch
padded to a multiple of the devices its rows split over. lm-eval's `device` and
`max_batch_size` are ignored (JAX places the model on its default device, or on the mesh).

What each request computes (as lm-eval's HF model does; docs/lm_eval.md):
  loglikelihood: the context and continuation are tokenized as one text and split at the
    context's tokens; one forward over (context + continuation)[-(max_length + 1):][:-1]; the
    sum of the continuation tokens' log-probs (log_softmax in float32 over the whole model
    vocabulary) and whether each was the argmax. An empty context is the prefix token (the
    tokenizer's BOS if it starts texts with one, else `<eod>`).
  loglikelihood_rolling: the text's tokens in lm-eval's disjoint windows of max_length
    (`get_rolling_token_windows`, context_len 1, the prefix token first), summed.
  generate_until: `yuanjax.generate.generate` (KV cache) from the context (its last
    max_length - max_gen_toks tokens), up to max_gen_toks new tokens or `<eod>`; the text is
    cut at the first of the task's `until` strings. Greedy unless do_sample / temperature.

Batching: requests are sorted by length (longest first) and taken batch_size at a time; a
forward's rows are right-padded to a bucket length (16, 32, 64, ... up to max_length) and its
batch to batch_size, so one compiled program serves every batch of a bucket. Log-likelihood
requests whose tokens differ in the last one only (one-token choices after the same context)
share one forward row, as in lm-eval's HF model. The model is
causal and runs with a dispatch that never drops tokens (`generate.generation_config`), so a
row's log-probs do not depend on its padding or on the other rows.
"""
from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from yuanjax import generate, loader
from yuanjax.model import Transformer

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api import model as lm_model
  from lm_eval.api import registry
  from lm_eval.models import utils as model_utils
except ImportError as e:  # an optional dependency
  raise ImportError('yuanjax.evals.lm_eval_model needs lm-eval 0.4.x: '
                    "pip install -c constraints.txt -e '.[eval]'") from e

MIN_BUCKET = 16
GEN_KWARGS = ('until', 'max_gen_toks', 'do_sample', 'temperature', 'top_k', 'top_p')


def bucket_length(n: int, max_length: int) -> int:
  """The padded length of a forward whose longest row has n tokens: the next power of two from
  MIN_BUCKET up, at most max_length (n <= max_length)."""
  return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_length)


def token_logprobs(params, inputs_BxL, targets_BxL, lengths_B, *, model: Transformer):
  """Each target's log-prob given the inputs up to its position (float32 [B, L]), whether it is
  the most likely token (bool [B, L]), and every token's log-prob after each row's last input
  (float32 [B, V])."""
  logits_BxLxV, _ = model.apply({'params': params}, inputs_BxL)
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  logp_BxL = jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
  last_BxV = jnp.take_along_axis(logp_BxLxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
  return logp_BxL, jnp.argmax(logp_BxLxV, axis=-1) == targets_BxL, last_BxV


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
    raise ValueError(f'{name}={value!r}: must be an integer >= 1')
  return int(value)


def _answer(tokens, n, logp_L, greedy_L, last_V) -> tuple[float, bool]:
  """(sum of the log-probs of the last n tokens, whether each was the argmax) from a forward
  over tokens[:-1]; the last token's from the log-probs after the last input (last_V), which
  are the same for every row of the same inputs."""
  if n == 0:
    return 0.0, True
  end = len(tokens) - 1
  head = slice(end - n, end - 1)  # the scored tokens but the last
  total = logp_L[head].astype(np.float64).sum() + float(last_V[tokens[-1]])
  return float(total), bool(greedy_L[head].all() and np.argmax(last_V) == tokens[-1])


@registry.register_model('yuanjax')
class YuanjaxLM(lm_model.TemplateLM):
  """A yuanjax checkpoint as an lm-eval model (module docstring)."""

  def __init__(self, checkpoint: str, batch_size: int | str = 1, max_length: int | None = None,
               max_gen_toks: int = 256, step: int | None = None, dtype: str | None = None,
               tokenizer: str | None = None, seed: int = 0, quantize: str = 'none',
               mesh: str | None = None, max_batch_size=None, device=None):
    super().__init__()
    del max_batch_size, device  # always passed by lm-eval: no automatic batch size; JAX places
    self.batch_size = _positive_int('batch_size', batch_size)
    self.max_gen_toks = _positive_int('max_gen_toks', max_gen_toks)
    self.seed = int(seed)
    self.mesh = None if mesh is None else generate.mesh_for(checkpoint, str(mesh).replace('/', ','))
    self.place = None if mesh is None else generate.Placement(self.mesh)
    self.rows = self.batch_size if mesh is None else -(-self.batch_size // self.place.rows) * (
        self.place.rows)  # a forward's batch: split evenly over the mesh
    self.model, self.params, self.tok = loader.load_checkpoint(
        checkpoint, overrides={'dtype': dtype} if dtype else {}, tokenizer=tokenizer,
        step=None if step is None else int(step), quantize=quantize,
        shardings=generate.load_shardings(self.mesh))
    m = self.model.config
    self.max_length = m.max_seq_len if max_length is None else _positive_int(
        'max_length', max_length)
    if self.max_length > m.max_seq_len:
      raise ValueError(f'max_length={self.max_length}: more than the checkpoint\'s '
                       f'config.model.max_seq_len={m.max_seq_len}')
    self.vocab_limit = min(self.tok.vocab_size, m.vocab_size)
    self._bos = self.tok.encode('')  # [] or the token every encoded text starts with
    scorer = Transformer(generate.generation_config(m))
    self._score = jax.jit(functools.partial(token_logprobs, model=scorer))

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    """model_args win over lm-eval's own settings (its CLI always passes batch_size)."""
    extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
    return cls(**{**extra, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    args = lm_utils.simple_parse_args_string(arg_string)
    return cls.create_from_arg_obj(args, additional_config)

  @property
  def eot_token_id(self) -> int:
    return self.tok.eod_id

  @property
  def prefix_token_id(self) -> int:
    return self._bos[0] if self._bos else self.tok.eod_id

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
    """The tokenizer's ids; add_special_tokens=False: without its leading BOS (if it has one)."""
    ids = self.tok.encode(string)
    return ids[len(self._bos):] if add_special_tokens is False else ids

  # ---------------------------------------------------------------- log-likelihoods

  def _score_rows(self, rows, disable_tqdm: bool) -> list[tuple[float, bool]]:
    """rows: (tokens, n): the sum of the log-probs of the last n tokens, each given the tokens
    before it, and whether all n were the argmax. Rows whose tokens differ in the last one only
    (one-token choices after one context) share a forward; batched by length (module docstring).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (tokens, _) in enumerate(rows):
      groups.setdefault(tuple(tokens[:-1]), []).append(i)
    inputs = sorted(groups, key=len, reverse=True)
    out = [None] * len(rows)
    for start in tqdm(range(0, len(inputs), self.batch_size), disable=disable_tqdm,
                      desc='yuanjax loglikelihood batches'):
      batch = inputs[start:start + self.batch_size]
      with self.place.context() if self.place else contextlib.nullcontext():
        scores = jax.device_get(self._score(self.params, *self._padded(batch, groups, rows)))
      for r, key in enumerate(batch):
        for i in groups[key]:
          out[i] = _answer(*rows[i], *(a[r] for a in scores))
    return out

  def _padded(self, batch, groups, rows):
    """Inputs and targets [rows, bucket length] (right-padded with 0) and the lengths of a
    batch of distinct inputs (each the tokens of its group's first row but the last)."""
    L = bucket_length(len(batch[0]), self.max_length)
    inputs, targets = (np.zeros((self.rows, L), np.int32) for _ in range(2))
    lengths = np.ones((self.rows,), np.int32)
    for r, key in enumerate(batch):
      lengths[r] = len(key)
      inputs[r, :len(key)], targets[r, :len(key)] = key, rows[groups[key][0]][0][1:]
    return inputs, targets, lengths

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):
    rows = []
    for (strings, context, continuation) in requests:
      if len(continuation) > self.max_length:
        raise ValueError(f'loglikelihood request {strings!r}: the continuation has '
                         f'{len(continuation)} tokens, more than max_length={self.max_length}')
      rows.append(((context + continuation)[-(self.max_length + 1):], len(continuation)))
    out = self._score_rows(rows, disable_tqdm)
    for (strings, _, _), answer in zip(requests, out):
      if strings is not None:
        self.cache_hook.add_partial('loglikelihood', strings, answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    windows = [self._windows(req.args[0]) for req in requests]
    rows = [(context + scored, len(scored)) for ws in windows for context, scored in ws]
    scores = iter(self._score_rows(rows, disable_tqdm))
    out = [sum(next(scores)[0] for _ in ws) for ws in windows]
    for req, total in zip(requests, out):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return out

  def _windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows (context, tokens to score) of the text's tokens."""
    tokens = self.tok_encode(text, add_special_tokens=False)
    windows = lm_utils.get_rolling_token_windows(tokens, prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)
    return [lm_utils.make_disjoint_window(w) for w in windows]

  # ---------------------------------------------------------------- generation

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Batches of the same generation settings, longest contexts first (module docstring)."""
    by_length = lambda args: (-len(self.tok_encode(args[0])), args[0])
    batches = model_utils.Collator([r.args for r in requests], sort_fn=by_length,
                                   group_by='gen_kwargs', group_fn=lambda args: args[1])
    out = []
    for chunk in tqdm(list(batches.get_batched(n=self.batch_size)), disable=disable_tqdm,
                      desc='yuanjax generate_until batches'):
      contexts, settings = zip(*chunk)
      texts = self._generate(list(contexts), settings[0])
      for args, text in zip(chunk, texts):
        self.cache_hook.add_partial('generate_until', args, text)
      out += texts
    return batches.get_original(out)

  def _settings(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
    """(yuanjax.generate's settings, the stop strings) of a request's generation kwargs."""
    kw = dict(model_utils.normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
    unknown = sorted(set(kw) - set(GEN_KWARGS))
    if unknown:
      raise ValueError(f'generation kwargs {unknown}: not supported (yuanjax takes {GEN_KWARGS})')
    if kw['max_gen_toks'] >= self.max_length:
      raise ValueError(f'max_gen_toks={kw["max_gen_toks"]}: must be less than '
                       f'max_length={self.max_length}')
    settings = dict(max_new_tokens=kw['max_gen_toks'],
                    temperature=float(kw.get('temperature') or 0.0),
                    top_k=int(kw.get('top_k') or 0), top_p=float(kw.get('top_p') or 1.0))
    return settings, kw['until']

  def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
    settings, until = self._settings(gen_kwargs)
    room = self.max_length - settings['max_new_tokens']
    prompts = [self.tok_encode(c)[-room:] or [self.prefix_token_id] for c in contexts]
    rows = prompts + [prompts[0]] * (self.batch_size - len(prompts))  # one batch shape
    outs = generate.generate(self.model, self.params, rows, seed=self.seed, eod_id=self.tok.eod_id,
                             max_len=self.max_length, vocab_limit=self.vocab_limit, mesh=self.mesh,
                             **settings)
    texts = [self.tok.decode(generate.strip_eod(o, self.tok.eod_id)) for o in outs[:len(prompts)]]
    return [model_utils.postprocess_generated_text(t, until, None) for t in texts]


def main() -> None:
  """lm-eval's command line (sys.argv), with `yuanjax` among its models."""
  from lm_eval import __main__ as lm_eval_main  # pylint: disable=g-import-not-at-top
  lm_eval_main.cli_evaluate()


if __name__ == '__main__':
  main()
