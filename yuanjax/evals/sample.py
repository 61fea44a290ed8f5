"""The trainer's end-of-run greedy sample: `yuanjax.generate` (KV cache, one jitted decode
loop) on one prompt, on this process's devices (the params gathered first when they span
processes: generation on the training mesh comes with issue 21's sharded inference)."""
from __future__ import annotations

from yuanjax import generate as generate_lib
from yuanjax.evals import generative


def greedy(model, params, prompt_ids, num_tokens: int, eod_id: int | None = None) -> list[int]:
  """Appends `num_tokens` argmax tokens to `prompt_ids`; returns the new ids (cut at <eod>)."""
  P = len(prompt_ids)
  if P == 0:
    raise ValueError('greedy: the prompt must have at least one token')
  if num_tokens <= 0:
    return []
  (out,) = generate_lib.generate(model, params, [list(prompt_ids)], max_new_tokens=num_tokens,
                                 eod_id=eod_id, max_len=max(P + num_tokens,
                                                            model.config.max_seq_len))
  return generate_lib.strip_eod(out, eod_id)


def end_of_run(model, params, tokenizer, prompt: str, num_tokens: int) -> str:
  """The prompt and its greedy continuation of num_tokens tokens (to <eod>)."""
  ids = greedy(model, generative.local_params(params), tokenizer.encode(prompt), num_tokens,
               eod_id=tokenizer.eod_id)
  return prompt + tokenizer.decode(ids)
