"""SFT data (yuanjax.data.sft): Yuan's line format and jsonl samples -> masked shards; whole
samples packed per row with nothing crossing between them; the loss on the responses only."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from yuanjax import config_lib, trainer
from yuanjax.data import ShardedDocuments, corpus, pipeline, prepare, sft
from yuanjax.data import tokenizer as tokenizer_lib
from yuanjax.data.__main__ import main as cli
from yuanjax.model import Transformer

SEQ_LEN = 48
GOOD_TXT = ['reverse: abc<sep>cba', 'two<n>lines<sep>an answer<n>in two', 'sum 2 3<sep>5']
BAD_TXT = ['no separator here', 'empty response<sep>   ', 'long<sep>' + 'abc ' * 200]
JSONL = [
    {
        'prompt': 'say hi',
        'response': 'hi'
    },
    {
        'messages': [{
            'role': 'user',
            'content': 'u1'
        }, {
            'role': 'assistant',
            'content': 'a1'
        }, {
            'role': 'user',
            'content': 'u2'
        }, {
            'role': 'assistant',
            'content': 'a2'
        }]
    },
    {
        'prompt': 'no response'
    },
    {
        'messages': [{
            'role': 'user',
            'content': 'u'
        }, {
            'role': 'user',
            'content': 'v'
        }]
    },
]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp('sft')
  text = 'reverse abc cba sum two lines an answer say hi u1 a1 u2 a2 in two\n' * 50
  tok = tokenizer_lib.train_from_documents([corpus.Document(text, 'm', None, 0)], d / 'tok', 300)
  (d / 'yuan.txt').write_text('\n'.join(GOOD_TXT[:2] + BAD_TXT + GOOD_TXT[2:] + ['']) + '\n')
  (d / 'chat.jsonl').write_text('\n'.join(map(json.dumps, JSONL)) + '\n{not json\n')
  inputs = [str(d / 'yuan.txt'), str(d / 'chat.jsonl')]
  assert cli([
      'prepare', '--format=sft', '--tokenizer',
      str(tok), '--input', *inputs, '--output',
      str(d / 'shards'), f'--seq_len={SEQ_LEN}'
  ]) == 0
  return dict(dir=d, tok=tokenizer_lib.Tokenizer(tok), shards=str(d / 'shards'))


def test_bad_samples_counted_and_reported_by_file_and_line(data):
  m = prepare.load_manifest(data['shards'])
  assert m['format'] == prepare.SFT_FORMAT and m['num_docs'] == 5
  assert m['num_skipped'] == {
      'no <sep>': 1,
      'empty response': 1,
      'longer than seq_len + 1 tokens': 1,
      'needs string "prompt" and "response" (or "messages")': 1,
      'the last message must be the assistant\'s (the response)': 1,
      'not JSON': 1,
  }
  places = [p.split(': ')[0] for p in m['skipped_at']]
  yuan, chat = str(data['dir'] / 'yuan.txt'), str(data['dir'] / 'chat.jsonl')
  assert m['skipped_at'][2].endswith('longer than seq_len + 1 tokens (407 > 49)')
  assert places == [f'{yuan}:3', f'{yuan}:4', f'{yuan}:5', f'{chat}:3', f'{chat}:4', f'{chat}:5']


def test_samples_end_with_eod_and_score_the_response(data):
  tok, docs = data['tok'], ShardedDocuments(data['shards'])
  want = [('reverse: abc', 'cba'), ('two\nlines', 'an answer\nin two'), ('sum 2 3', '5'),
          ('say hi', 'hi'), ('u1\na1\nu2', 'a2')]  # multi-turn: turns joined by <n>, then <sep>
  assert docs.loss_masked and len(docs) == len(want)
  for i, (prompt, response) in enumerate(want):
    p, r = tok.encode(prompt), tok.encode(response)
    np.testing.assert_array_equal(docs[i], p + [tok.sep_id] + r + [tok.eod_id])
    np.testing.assert_array_equal(docs.loss_mask(i), [0] * (len(p) + 1) + [1] * (len(r) + 1))


def test_messages_render_as_fastchats_yuan2_template():
  """FastChat's "yuan2" template renders this conversation, for generation (the assistant's last
  message left empty), as 'be brief\nu1<n>a1<n>u2<sep>': the system message then '\n', every
  non-empty message then '<n>', the trailing '<n>' stripped, '<sep>'. Yuan's tokenizer reads '\n'
  as '<n>' (sft.prompt_ids)."""
  turns = [('system', 'be brief'), ('user', 'u1'), ('assistant', 'a1'), ('user', ''),
           ('user', 'u2'), ('assistant', 'a2')]
  messages = [{'role': r, 'content': c} for r, c in turns]
  prompt, response = sft.render_messages(messages)
  assert (prompt + '<sep>', response) == ('be brief\nu1\na1\nu2<sep>', 'a2')
  assert sft.render_messages(messages[1:3] + messages[4:])[0] == 'u1\na1\nu2'  # 2 turns
  last = [{'role': 'user', 'content': 'explain<n>'}, {'role': 'assistant', 'content': 'ok'}]
  assert sft.render_messages(last)[0] == 'explain<n>'  # not FastChat's rstrip: see sft


def _data_config(shards, **kw):
  c = pipeline.data_config()
  c.update({'path': shards, 'fim_rate': 0.0, 'eval_fraction': 0.0, 'prefetch': 0, **kw})
  return c


def _batch(data, batch=4, seq_len=SEQ_LEN):
  train, _, _ = pipeline.make_datasets(_data_config(data['shards']), global_batch_size=batch,
                                       seq_len=seq_len, process_index=0, process_count=1)
  return next(train)


def test_rows_hold_whole_samples_and_nothing_crosses_them(data):
  docs, b = ShardedDocuments(data['shards']), _batch(data)
  samples = {tuple(docs[i].tolist()): tuple(docs.loss_mask(i).tolist()) for i in range(len(docs))}
  seen = 0
  for row in range(4):
    seg, pos = b['segment_ids'][row], b['positions'][row]
    for s in set(seg[seg > 0].tolist()):
      at = np.flatnonzero(seg == s)
      tokens = b['inputs'][row][at].tolist()
      if tokens[-1] != data['tok'].eod_id:  # the row's last sample: its <eod> is a target only
        tokens.append(int(b['targets'][row][at[-1]]))
      assert tuple(tokens) in samples  # a whole sample, nothing of another
      np.testing.assert_array_equal(pos[at], np.arange(len(at)))  # positions restart
      # A target is scored when its token is; none from <eod> into the next sample.
      mask = samples[tuple(tokens)][1:] + (0,)
      np.testing.assert_array_equal(b['loss_mask'][row][at], mask[:len(at)])
      seen += 1
    assert b['loss_mask'][row][seg == 0].sum() == 0  # padding is not scored
  assert seen >= 5


def test_masked_loss_is_the_masked_mean(data):
  m = config_lib.tiny_model()
  m.vocab_size = data['tok'].vocab_size
  b = jax.tree.map(jnp.asarray, _batch(data))
  model = Transformer(m)
  params = model.init(jax.random.key(0), b['inputs'])['params']
  _, out = trainer.loss_fn(params, model, b, jax.random.key(1))
  logits = np.asarray(
      model.apply({'params': params}, b['inputs'], segment_ids=b['segment_ids'],
                  positions=b['positions'])[0], np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, np.asarray(b['targets'])[..., None], -1)[..., 0]
  mask = np.asarray(b['loss_mask'])
  assert 0 < mask.sum() < (np.asarray(b['segment_ids']) > 0).sum()  # prompts are not scored
  assert float(out['lm_loss']) == pytest.approx((nll * mask).sum() / mask.sum(), rel=1e-5)
  assert float(out['tokens']) == mask.sum()


def test_fim_and_too_short_rows_refused(data):
  with pytest.raises(ValueError, match='data.fim_rate=0.5: SFT shards'):
    pipeline.make_datasets(_data_config(data['shards'], fim_rate=0.5), global_batch_size=2,
                           seq_len=SEQ_LEN, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='longer than train.seq_len \\+ 1 = 5; prepare the data'):
    pipeline.make_datasets(_data_config(data['shards']), global_batch_size=2, seq_len=4,
                           process_index=0, process_count=1)


def test_plain_shards_still_load(data, tmp_path):
  (tmp_path / 'a.txt').write_text('say hi in two lines\n' * 20)
  prepare.prepare(data['tok'].model_path, [str(tmp_path / 'a.txt')], tmp_path / 'shards',
                  progress=False)
  docs = ShardedDocuments(tmp_path / 'shards')
  assert prepare.load_manifest(tmp_path / 'shards')['format'] == prepare.FORMAT
  assert not docs.loss_masked
  b = next(
      pipeline.make_datasets(_data_config(str(tmp_path / 'shards')), global_batch_size=2,
                             seq_len=16, process_index=0, process_count=1)[0])
  assert b['loss_mask'].min() == 1.0  # every token scored, as before


def test_sft_shards_in_a_mixture_refused(data):
  c = pipeline.data_config()
  c.update({'fim_rate': 0.0, 'prefetch': 0})
  c.mixture = tuple({'path': data['shards'], 'weight': 1.0, 'name': n} for n in ('a', 'b'))
  with pytest.raises(ValueError, match='holds SFT shards'):
    pipeline.make_datasets(c, global_batch_size=2, seq_len=SEQ_LEN, process_index=0,
                           process_count=1)
