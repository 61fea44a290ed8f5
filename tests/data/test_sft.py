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


# ------------------------------------------------------------------ chat templates

TWO_TURNS = [('user', 'u1'), ('assistant', 'a1'), ('user', 'u2'), ('assistant', 'a2')]


def _messages(turns):
  return [{'role': r, 'content': c} for r, c in turns]


def _rendered(name, turns):
  return ''.join(p for p, _ in sft.TEMPLATES[name].render(_messages(turns)))


def test_templates_render_the_exact_strings():
  """mistral: FastChat's "mistral" conversation ('[INST] u1 [/INST] a1</s>[INST] u2 [/INST]
  a2</s>', its system message '[INST] sys\nu1') after the BOS its tokenizer adds, i.e. the
  Mixtral-8x7B-Instruct model card's '<s>[INST] Instruction [/INST] Model answer</s>'. yuan2:
  FastChat's yuan2 prompt, the response and <eod>."""
  assert _rendered('mistral', TWO_TURNS) == '<s>[INST] u1 [/INST] a1</s>[INST] u2 [/INST] a2</s>'
  assert _rendered('mistral', [('system', 'be brief')] +
                   TWO_TURNS) == ('<s>[INST] be brief\nu1 [/INST] a1</s>[INST] u2 [/INST] a2</s>')
  assert _rendered('yuan2', TWO_TURNS) == 'u1\na1\nu2<sep>a2<eod>'
  for turns in (TWO_TURNS[:1] + TWO_TURNS, TWO_TURNS[1:], [('system', 's')] + TWO_TURNS[1:]):
    with pytest.raises(ValueError, match='alternate user, assistant'):
      sft.TEMPLATES['mistral'].render(_messages(turns))


@pytest.fixture(scope='module')
def mixtral_tok(tmp_path_factory):
  """A Llama-style sentencepiece model (<unk> <s> </s>, a dummy prefix, no <sep>), read with
  Mixtral's runtime options."""
  spm = pytest.importorskip('sentencepiece')
  from yuanjax.interop import mixtral_mapping
  d = tmp_path_factory.mktemp('mixtral_tok')
  (d / 'corpus.txt').write_text('[INST] reverse: abc u1 u2 [/INST] cba a1 a2 say hi\n' * 50)
  spm.SentencePieceTrainer.train(input=str(d / 'corpus.txt'), model_prefix=str(d / 'tok'),
                                 vocab_size=300, model_type='bpe', byte_fallback=True,
                                 num_threads=1, minloglevel=2)
  return tokenizer_lib.Tokenizer(d / 'tok.model', **mixtral_mapping.tokenizer_options())


def test_mistral_scores_exactly_the_assistant_tokens_and_eos(mixtral_tok):
  """The tokens are Mixtral-Instruct's reference ([BOS] tok('[INST]') tok(u1) tok('[/INST]')
  tok(a1) [EOS] ..., tok adding a prefix space) and HF's encoding of the rendered string; the
  mask is 1 on tok(a_i) and its EOS only."""
  tok, sp = mixtral_tok, mixtral_tok.sp
  sample = sft.Sample('x', tuple(_messages(TWO_TURNS)))
  ids, scored = sft.encode(tok, sample, sft.chat_template(tok, 'mistral'))
  want, mask = [sp.bos_id()], [0]
  for user, answer in (('u1', 'a1'), ('u2', 'a2')):
    prompt = sp.encode('[INST]') + sp.encode(user) + sp.encode('[/INST]')
    want += prompt + sp.encode(answer) + [sp.eos_id()]
    mask += [0] * len(prompt) + [1] * (len(sp.encode(answer)) + 1)
  assert ids.tolist() == want and scored.tolist() == mask
  assert ids.tolist() == tok.encode(_rendered('mistral', TWO_TURNS), add_bos=False)  # as HF's
  assert tok.decode(ids) == _rendered('mistral', TWO_TURNS).removeprefix('<s>')  # BOS as encode's
  assert sft.prompt_ids(tok, 'u1') == want[:1 + len(prompt)]  # where the assistant turn starts
  assert sft.chat_template(tok).name == 'mistral'  # the default for a tokenizer without <sep>


def test_template_and_tokenizer_mismatch_refused_before_any_write(data, mixtral_tok, tmp_path):
  inputs = [str(data['dir'] / 'yuan.txt')]
  cases = [(mixtral_tok, 'yuan2', "chat template 'yuan2' needs '<sep>', which tokenizer"),
           (data['tok'], 'mistral', "chat template 'mistral' ends responses with '</s>', but "
            "tokenizer .* ends documents with '<eod>'"),
           (data['tok'], 'llama3', "chat_template='llama3': known templates are yuan2, mistral")]
  for tok, name, match in cases:
    with pytest.raises(ValueError, match=match):
      sft.prepare_sft(tok, inputs, tmp_path / name, seq_len=SEQ_LEN, chat_template_name=name)
    assert not (tmp_path / name).exists()
  assert sft.chat_template(data['tok']).name == 'yuan2'


def test_mistral_shards_and_data_chat_template(data, mixtral_tok, tmp_path):
  """prepare records the template and the tokenizer's options; training reads the shards with
  that tokenizer (Mixtral's '</s>' ends the samples), and data.chat_template must name it."""
  m = sft.prepare_sft(mixtral_tok, [str(data['dir'] / 'chat.jsonl')], tmp_path / 'mx',
                      seq_len=SEQ_LEN)
  assert (m['chat_template'], m['eod_id'], m['sep_id']) == ('mistral', 2, None)
  docs = ShardedDocuments(tmp_path / 'mx')
  assert len(docs) == 2 and all(docs[i][0] == 1 and docs[i][-1] == 2 for i in range(2))
  for name, ok in (('mistral', True), ('yuan2', False), (None, True)):
    cfg = _data_config(str(tmp_path / 'mx'), chat_template=name)
    if ok:
      _, _, tok = pipeline.make_datasets(cfg, global_batch_size=2, seq_len=SEQ_LEN, process_index=0,
                                         process_count=1)
      assert tok.eod_id == 2 and tok.encode('hi')[0] == 1
    else:
      with pytest.raises(ValueError, match="data.chat_template='yuan2' but .* prepared with "
                         "'mistral'"):
        pipeline.make_datasets(cfg, global_batch_size=2, seq_len=SEQ_LEN, process_index=0,
                               process_count=1)
