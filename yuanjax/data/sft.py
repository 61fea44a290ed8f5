"""Supervised fine-tuning data: instruction/response samples whose loss is on the response.

  python -m yuanjax.data prepare --format=sft --tokenizer T --input F... --output D \
      --seq_len 4096 [--newline_token '<n>'] [--chat_template yuan2|mistral]

T: a SentencePiece .model, or a checkpoint or tokenizer dir (Yuan2-M32-hf, its tokenizer/,
Mixtral): loaded as its runtime loads it (yuanjax.loader.load_tokenizer), the options recorded
in the manifest so that training reads the shards with the same tokenizer.

Inputs (one sample per line; a file's kind is its extension):
  .txt    Yuan's SFT line format (Yuan2.0-M32 docs/data_process.md): `instruction<sep>response`,
          `<n>` for a newline inside either part.
  .jsonl  {"prompt": ..., "response": ...}, or {"messages": [{"role", "content"}, ...]}:
          multi-turn, rendered as Yuan's chat runtime renders a conversation (the "yuan2"
          template Yuan-2.0 registered in FastChat, docs/Yuan2_fastchat.md: every turn before
          the last joined by newlines (`<n>`), `<sep>` after them, stop at `<eod>`); the last
          message must be the assistant's, and it alone is scored (FastChat's
          last_response_loss; Yuan's own `--sft-stage` scores the one response of a line).

Chat templates (`TEMPLATES`; --chat_template, default: the first the tokenizer can render, so
'yuan2' for a tokenizer with `<sep>`, 'mistral' for Mixtral's) render every sample, a line or a
prompt/response pair being one user turn and one assistant turn:
  yuan2    `prompt<sep>response<eod>` (above); multi-turn: the earlier turns are the prompt and
           the last response alone is scored
  mistral  Mixtral-Instruct's `<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>`: FastChat's
           "mistral" template with the tokenizer's BOS first; a system message opens the first
           instruction (`[INST] system\nu1 [/INST]`); turns alternate user/assistant; every
           assistant turn and its `</s>` is scored
The rendered conversation is encoded as HF encodes a rendered chat: the template's special
tokens as their ids, the text between them as one text each (with the tokenizer's own special
tokens split out, as HF does); the scored tokens are those of the scored parts. `prompt_ids` is what a generation starts from (the text up to the assistant's
turn); it stops at the tokenizer's end of document (`<eod>`, Mixtral's `</s>`).

The scored tokens are the assistant's and the closing end of document. Bad samples (no `<sep>`, no prompt/response, empty response, longer than
`seq_len + 1` tokens, i.e. one packed row) are skipped, counted by reason, and reported by file
and line (the first ones logged, all counts and the first 20 places in the manifest); nothing is
truncated.

Shards: the plain layout (yuanjax.data.prepare) plus, per shard, `shard_NNNNN.mask.bin` (uint8,
1 where the token is scored), under manifest format prepare.SFT_FORMAT (older plain shards still
load; older code refuses these); the manifest records `chat_template` (config.data.chat_template,
when set, must name it) and `tokenizer_options`.

Packing (`make_pipeline`): whole samples only, next-fit into rows of `seq_len + 1` tokens
padded at the end (MaxText's and Yuan's SFT packing reset positions per sample): the row's
segment ids and positions restart after each `<eod>` (prepare.row_to_example), so no attention,
LF-convolution state or position crosses samples. A row's target is scored when the token is.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence

import grain
import numpy as np

from yuanjax import publish
from yuanjax.data import corpus, pipeline, prepare
from yuanjax.data.tokenizer import EOD, SEP, Tokenizer

log = logging.getLogger(__name__)

_REPORTED = 20  # places of skipped samples kept in the manifest


@dataclasses.dataclass(frozen=True)
class Sample:
  where: str  # file:line
  messages: tuple = ()  # [{'role', 'content'}], the last the assistant's (the response)
  error: str | None = None  # why it is skipped (counted by this)
  detail: str = ''


def _turns(prompt: str, response: str) -> tuple:
  return ({'role': 'user', 'content': prompt}, {'role': 'assistant', 'content': response})


def _check_messages(messages) -> None:
  """ValueError unless `messages` is a conversation of string turns ending with the assistant's."""
  if not isinstance(messages, (list, tuple)) or len(messages) < 2:
    raise ValueError('"messages" must be a list of at least 2 turns')
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get('content'), str):
      raise ValueError('each message needs a "role" and a string "content"')
  if messages[-1].get('role') != 'assistant':
    raise ValueError('the last message must be the assistant\'s (the response)')


def render_messages(messages) -> tuple[str, str]:
  """(prompt, response) of a conversation in the yuan2 template: the non-empty turns before the
  last joined by newlines (Yuan's `<n>`), the last (the assistant's) the response. ValueError
  when malformed.

  FastChat's "yuan2" template (SeparatorStyle.YUAN2, sep '<sep>', sep2 '\n', no roles printed)
  renders a system message followed by a newline, then every non-empty message followed by '<n>',
  strips the trailing '<n>' and appends '<sep>'. A system turn given first is thus the same
  string. Unlike FastChat, only the final '<n>' is removed: its str.rstrip('<n>') strips any
  trailing '<', 'n' and '>' characters, so it also cuts a last turn ending in 'n'."""
  _check_messages(messages)
  return '\n'.join(m['content'] for m in messages[:-1] if m['content']), messages[-1]['content']


class Special(str):
  """A special token a chat template writes: encoded as its id, whether or not the tokenizer
  splits it out of a text (a plain .model path's user-defined symbols in a character model are
  not)."""


def _yuan2(messages) -> list[tuple[str, bool]]:
  prompt, response = render_messages(messages)
  return [(prompt, False), (Special(SEP), False), (response, True), (Special(EOD), True)]


def _mistral(messages) -> list[tuple[str, bool]]:
  """FastChat's "mistral" (SeparatorStyle.LLAMA2, sep ' ', sep2 '</s>'), the BOS its tokenizer
  adds written first: '<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>'."""
  _check_messages(messages)
  system = messages[0]['content'] if messages[0].get('role') == 'system' else None
  turns = messages[1:] if system is not None else messages
  if [m.get('role') for m in turns] != ['user', 'assistant'] * (len(turns) // 2) or not turns:
    raise ValueError('mistral: the turns must alternate user, assistant (after an optional '
                     'first system message)')
  parts = [(Special('<s>'), False)]
  for i in range(0, len(turns), 2):
    user = turns[i]['content'] if i or system is None else f'{system}\n{turns[i]["content"]}'
    parts += [(f'[INST] {user} [/INST]', False), (' ' + turns[i + 1]['content'], True),
              (Special('</s>'), True)]
  return parts


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """How a model family writes a conversation: `render(messages)` gives its text in (part,
  scored) pieces, its special tokens `Special` parts; the tokenizer must have each of
  `specials`, and `eod` must end its documents (the token a response ends with and generation
  stops at)."""
  name: str
  render: Callable[[Sequence[dict]], list[tuple[str, bool]]]
  specials: tuple[str, ...]
  eod: str


TEMPLATES = {
    t.name: t for t in (ChatTemplate('yuan2', _yuan2, (SEP, EOD), EOD),
                        ChatTemplate('mistral', _mistral, ('<s>', '</s>'), '</s>'))
}


def _problem(tok: Tokenizer, t: ChatTemplate) -> str | None:
  """Why `tok` cannot encode template `t`, or None."""
  for piece in t.specials:
    if not tok.has_piece(piece):
      return f'needs {piece!r}, which tokenizer {tok.model_path} has not'
  if tok.eod_piece != t.eod:
    return f'ends responses with {t.eod!r}, but tokenizer {tok.model_path} ends documents with ' \
           f'{tok.eod_piece!r}'
  return None


def chat_template(tok: Tokenizer, name: str | None = None) -> ChatTemplate:
  """The chat template `name`, or (None) the first of TEMPLATES that `tok` can encode;
  ValueError naming the template and the token it lacks."""
  if name is not None and name not in TEMPLATES:
    raise ValueError(f'chat_template={name!r}: known templates are {", ".join(TEMPLATES)}')
  candidates = [TEMPLATES[name]] if name else list(TEMPLATES.values())
  problems = [(t.name, _problem(tok, t)) for t in candidates]
  for (n, problem), t in zip(problems, candidates):
    if problem is None:
      return t
  raise ValueError('; '.join(f'chat template {n!r} {p}' for n, p in problems))


def _prefix_len(tok: Tokenizer, text: str, ids: list[int]) -> int:
  """How many of `ids` (a longer text's) are `text`'s; ValueError if they are not a prefix."""
  prefix = tok.encode(text, add_bos=False)
  if prefix != ids[:len(prefix)]:
    raise ValueError(f'the tokens of {text[-30:]!r} change with the text after them')
  return len(prefix)


def _encode_text(tok: Tokenizer, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
  """(ids, scored) of text parts encoded as one text (HF encodes a rendered chat so between its
  special tokens); where each part ends is found by encoding the text up to it."""
  texts = list(itertools.accumulate(p for p, _ in parts))
  ids = tok.encode(texts[-1], add_bos=False)
  ends = [_prefix_len(tok, text, ids) for text in texts[:-1]] + [len(ids)]
  return ids, [
      score for start, end, (_, score) in zip([0] + ends, ends, parts) for _ in range(start, end)
  ]


def encode_parts(tok: Tokenizer, parts: list[tuple[str, bool]]) -> tuple[list[int], np.ndarray]:
  """(ids of a rendered conversation, 1 on those of its scored parts): each `Special` part its
  id, each run of text parts between them encoded as one text."""
  ids, scored = [], []
  for special, run in itertools.groupby(parts, key=lambda p: isinstance(p[0], Special)):
    run = list(run)
    if special:
      ids += [tok.token_id(p) for p, _ in run]
      scored += [score for _, score in run]
    else:
      more_ids, more_scored = _encode_text(tok, run)
      ids += more_ids
      scored += more_scored
  return ids, np.asarray(scored, np.uint8)


def _from_line(text: str, where: str) -> Sample:
  if SEP not in text:
    return Sample(where, error=f'no {SEP}')
  prompt, response = text.split(SEP, 1)
  return Sample(where, _turns(prompt.replace('<n>', '\n'), response.replace('<n>', '\n')))


def _from_json(text: str, where: str) -> Sample:
  try:
    obj = json.loads(text)
  except ValueError as e:  # json.JSONDecodeError
    return Sample(where, error='not JSON', detail=str(e)[:200])
  if isinstance(obj, dict) and 'messages' in obj:
    try:
      _check_messages(obj['messages'])
    except ValueError as e:
      return Sample(where, error=str(e))
    return Sample(where, tuple(obj['messages']))
  if not (isinstance(obj, dict) and isinstance(obj.get('prompt'), str) and
          isinstance(obj.get('response'), str)):
    return Sample(where, error='needs string "prompt" and "response" (or "messages")')
  return Sample(where, _turns(obj['prompt'], obj['response']))


def read_samples(files: Sequence[str]) -> Iterator[Sample]:
  """The samples of .txt (Yuan's line format) and .jsonl files; blank lines are not samples."""
  for path in files:
    parse = _from_json if path.endswith('.jsonl') else _from_line
    with open(path, encoding='utf-8', errors='strict') as f:
      for n, line in enumerate(f, 1):
        text = line.rstrip('\n')
        if text.strip():
          yield parse(text, f'{path}:{n}')


def prompt_ids(tok: Tokenizer, prompt: str, template: str | None = None) -> list[int]:
  """The ids a response to `prompt` (one user turn; `<n>` a newline) follows, in training and in
  chat generation (`python -m yuanjax.generate --chat`): the chat template's text up to the
  assistant's turn (yuan2: `prompt<sep>`; mistral: `<s>[INST] prompt [/INST]`). `template`:
  its name (None: the tokenizer's, `chat_template`)."""
  parts = chat_template(tok, template).render(_turns(prompt.replace('<n>', '\n'), ''))
  return encode_parts(tok, [p for p in parts if not p[1]])[0]


def encode(tok: Tokenizer, sample: Sample,
           template: ChatTemplate | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(tokens of the sample rendered by `template` (None: the tokenizer's), scored: 1 on the
  assistant's tokens and the end of document closing them). ValueError: a malformed sample."""
  template = template or chat_template(tok)
  ids, scored = encode_parts(tok, template.render(sample.messages))
  return np.asarray(ids, prepare.TOKEN_DTYPE), scored


class _MaskedShardWriter(prepare._ShardWriter):  # pylint: disable=protected-access
  """Shards with a `.mask.bin` beside each token file."""

  def _open(self):
    super()._open()
    self._mask = open(os.path.join(self.out_dir, self._name + '.mask.bin'), 'wb')

  def add_sample(self, ids: np.ndarray, scored: np.ndarray):
    if self._file is None:
      self._open()
    self._mask.write(scored.tobytes())
    self.add(ids)

  def close(self):
    if self._file is None:
      return
    self._mask.close()
    super().close()
    self.shards[-1]['loss_mask'] = self._name + '.mask.bin'


def _check(tok: Tokenizer, template: ChatTemplate, sample: Sample, seq_len: int):
  """(ids, scored) of a good sample, or (why it is skipped, detail)."""
  if sample.error:
    return sample.error, sample.detail
  if not sample.messages[-1]['content'].strip():
    return 'empty response', ''
  try:
    ids, scored = encode(tok, sample, template)
  except ValueError as e:
    return str(e), ''
  if len(ids) > seq_len + 1:
    return 'longer than seq_len + 1 tokens', f'{len(ids)} > {seq_len + 1}'
  return ids, scored


def prepare_sft(tokenizer: str | Tokenizer, inputs, output_dir, *, seq_len: int,
                newline_token: str | None = None, chat_template_name: str | None = None,
                shard_tokens: int = prepare.DEFAULT_SHARD_TOKENS, overwrite: bool = False,
                manifest_tokenizer: str | None = None) -> dict:
  """Tokenizes SFT samples into masked shards in output_dir; returns the manifest.
  `tokenizer`: a .model path (read with `newline_token`) or a Tokenizer; `chat_template_name`:
  one of TEMPLATES (None: the tokenizer's). `manifest_tokenizer`: the tokenizer path recorded
  (relative: to the shards directory)."""
  if seq_len < 1:
    raise ValueError(f'seq_len must be positive, got {seq_len}')
  files = corpus.expand_inputs(inputs)
  if isinstance(tokenizer, Tokenizer):
    if newline_token is not None:
      raise ValueError('newline_token is for a tokenizer .model path; a Tokenizer has its own')
    tok = tokenizer
  else:
    tok = Tokenizer(tokenizer, newline_token=newline_token)
  template = chat_template(tok, chat_template_name)
  output_dir = os.path.abspath(os.fspath(output_dir))
  if os.path.exists(output_dir) and not overwrite:
    raise ValueError(f'{output_dir}: already exists (pass --overwrite to replace it)')

  def write(tmp):
    writer = _MaskedShardWriter(tmp, shard_tokens)
    skipped, places, scored_tokens = collections.Counter(), [], 0
    for sample in read_samples(files):
      out = _check(tok, template, sample, seq_len)
      if isinstance(out[0], str):
        skipped[out[0]] += 1
        if len(places) < _REPORTED:
          places.append(f'{sample.where}: {out[0]}' + (f' ({out[1]})' if out[1] else ''))
          log.warning('%s; skipped', places[-1])
        continue
      writer.add_sample(*out)
      scored_tokens += int(out[1].sum())
    writer.close()
    if not writer.shards:
      raise corpus.InputError(f'no usable sample in {files} (skipped: {dict(skipped)}; '
                              f'{places[:3]})')
    manifest = dict(
        format=prepare.SFT_FORMAT, tokenizer=manifest_tokenizer or os.path.abspath(tok.model_path),
        **prepare.tokenizer_fingerprint(tok.model_path, tok.vocab_size), eod_id=tok.eod_id,
        sep_id=tok.sep_id if tok.has_piece(SEP) else None, newline_token=tok.newline_token,
        tokenizer_options=tok.options, chat_template=template.name, dtype=np.dtype(
            prepare.TOKEN_DTYPE).name, num_docs=sum(s['num_docs'] for s in writer.shards),
        num_tokens=sum(s['num_tokens'] for s in writer.shards), num_scored_tokens=scored_tokens,
        seq_len=seq_len, num_skipped=dict(skipped), skipped_at=places, shards=writer.shards,
        num_inputs=len(files))
    with open(os.path.join(tmp, prepare.MANIFEST), 'w') as f:
      json.dump(manifest, f, indent=1)
    return manifest

  return publish.directory(output_dir, write, overwrite=overwrite)


def check_chat_template(source, name: str | None) -> None:
  """config.data.chat_template (None: any) names the template SFT shards were prepared with."""
  if name is None:
    return
  if name not in TEMPLATES:
    raise ValueError(f'data.chat_template={name!r}: known templates are {", ".join(TEMPLATES)}')
  have = source.manifest.get('chat_template', 'yuan2') if getattr(source, 'loss_masked',
                                                                  False) else None
  if have != name:
    raise ValueError(f'data.chat_template={name!r} but {source.path} holds ' +
                     (f'SFT shards prepared with {have!r}' if have else 'no SFT shards'))


# --------------------------------------------------------------------------- packing


def pack(lengths: np.ndarray, row_len: int) -> list[np.ndarray]:
  """Next-fit: runs of consecutive entries whose lengths sum to <= row_len (their positions)."""
  rows, start, used = [], 0, 0
  for i, n in enumerate(lengths.tolist()):
    if used + n > row_len:
      rows.append(np.arange(start, i))
      start, used = i, 0
    used += n
  if len(lengths):
    rows.append(np.arange(start, len(lengths)))
  return rows


class _Row:
  """Doc ids of one row -> its example: samples back to back, padding after, the loss mask the
  scored tokens'."""

  def __init__(self, source, row_len: int, special: pipeline.SpecialIds):
    self.source, self.row_len, self.special = source, row_len, special

  def __call__(self, doc_ids: np.ndarray) -> dict[str, np.ndarray]:
    tokens = np.full(self.row_len, -1, np.int32)  # negative: padding (row_to_example)
    scored = np.zeros(self.row_len, np.float32)
    at = 0
    for d in doc_ids.tolist():
      doc = self.source[d]
      tokens[at:at + len(doc)] = doc
      scored[at:at + len(doc)] = self.source.loss_mask(d)
      at += len(doc)
    ex = pipeline.row_to_example(tokens, eod_id=self.special.eod, pad_id=self.special.pad)
    ex['loss_mask'] = ex['loss_mask'] * scored[1:]
    return ex


def _rows(source, ids: np.ndarray, row_len: int) -> list[np.ndarray]:
  return [ids[r] for r in pack(source.doc_lengths()[ids], row_len)]


def make_pipeline(source, *, seq_len: int, batch_size: int, special: pipeline.SpecialIds,
                  doc_ids: np.ndarray | None = None, train: bool = True, seed: int = 0,
                  fim_rate: float = 0.0, process_index: int = 0, process_count: int = 1,
                  prefetch: int = 2) -> grain.IterDataset:
  """pipeline.make_pipeline for SFT shards (see the module docstring): train rows are packed
  once from a seeded order of this process's samples, then shuffled every epoch; eval rows are
  in order, padded with empty rows to the same number of batches on every process."""
  if fim_rate:
    raise ValueError(f'data.fim_rate={fim_rate}: SFT shards ({source.path}) take no '
                     'fill-in-the-middle (set it to 0, as Yuan\'s SFT does)')
  row_len = seq_len + 1
  all_ids = np.arange(len(source)) if doc_ids is None else np.asarray(doc_ids, np.int64)
  longest = int(source.doc_lengths()[all_ids].max(initial=0))
  if longest > row_len:
    raise ValueError(f'{source.path}: a sample of {longest} tokens is longer than '
                     f'train.seq_len + 1 = {row_len}; prepare the data with --seq_len {seq_len}')
  shard = lambda p: pipeline.process_shard(all_ids, p, process_count)
  ids = shard(process_index)
  if train:
    if not len(ids):
      raise ValueError(f'process {process_index} of {process_count} gets no training samples')
    order = np.random.default_rng(seed).permutation(ids)
    ds = grain.MapDataset.source(_rows(source, order, row_len)).shuffle(seed=seed).repeat(None)
  else:
    counts = [len(_rows(source, shard(p), row_len)) for p in range(process_count)]
    num_rows = -(-max(counts) // batch_size) * batch_size
    rows = _rows(source, ids, row_len)
    ds = grain.MapDataset.source(rows + [np.zeros(0, np.int64)] * (num_rows - len(rows)))
  ds = ds.map(_Row(source, row_len, special)).to_iter_dataset()
  ds = ds.batch(batch_size, drop_remainder=True)
  if prefetch:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch)
  return ds
