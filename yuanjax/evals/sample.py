"""The trainer's end-of-run greedy sample: `yuanjax.generate` (KV cache, one jitted decode
loop) on one prompt, on the training mesh when one is given (the params decoded where they lie,
none gathered; every process runs it and reads the same tokens)."""
from __future__ import annotations

from yuanjax import generate as generate_lib


def greedy(model, params, prompt_ids, num_tokens: int, eod_id: int | None = None, mesh=None,
           rules=None) -> list[int]:
  """Appends `num_tokens` argmax tokens to `prompt_ids`; returns the new ids (cut at <eod>).
  mesh, rules: generate's (the params already on the mesh)."""
  P = len(prompt_ids)
  if P == 0:
    raise ValueError('greedy: the prompt must have at least one token')
  if num_tokens <= 0:
    return []
  (out,) = generate_lib.generate(model, params, [list(prompt_ids)], max_new_tokens=num_tokens,
                                 eod_id=eod_id, max_len=max(P + num_tokens,
                                                            model.config.max_seq_len), mesh=mesh,
                                 rules=rules)
  return generate_lib.strip_eod(out, eod_id)


def end_of_run(model, params, tokenizer, prompt: str, num_tokens: int, mesh=None,
               rules=None) -> str:
  """The prompt and its greedy continuation of num_tokens tokens (to <eod>)."""
  ids = greedy(model, params, tokenizer.encode(prompt), num_tokens, eod_id=tokenizer.eod_id,
               mesh=mesh, rules=rules)
  return prompt + tokenizer.decode(ids)
