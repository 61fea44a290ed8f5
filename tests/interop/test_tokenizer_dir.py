"""Released tokenizers as their runtimes load them (yuanjax.loader.load_tokenizer): a
tokenizer-only dir (tokenizer.model, tokenizer_config.json, special_tokens_map.json, no
config.json, as Yuan2-M32-hf's tokenizer/) and the special tokens HF splits out of a text."""
import json

import pytest

from yuanjax import loader
from yuanjax.data.tokenizer import YUAN_ADDED_TOKENS
from tests.interop import checkpoints

spm = pytest.importorskip('sentencepiece')


def _yuan_like_model(root) -> str:
  """Yuan's layout at toy size: '<eod>' and '<sep>' are control pieces, so plain SentencePiece
  encoding spells a literal '<eod>' out in pieces (as the released model does)."""
  (root / 'corpus.txt').write_text('\n'.join(f'line {i} of some <text>' for i in range(300)))
  spm.SentencePieceTrainer.train(input=str(root / 'corpus.txt'), model_prefix=str(root / 'yuan'),
                                 vocab_size=80, model_type='bpe', control_symbols=[
                                     '<eod>', '<sep>'
                                 ], user_defined_symbols=['<n>'], num_threads=1, minloglevel=2)
  return str(root / 'yuan.model')


def _tokenizer_dir(root, model: str, config: dict, special_tokens_map: dict):
  d = root / 'tokenizer'
  d.mkdir()
  (d / 'tokenizer.model').write_bytes(open(model, 'rb').read())
  (d / 'tokenizer_config.json').write_text(json.dumps(config))
  (d / 'special_tokens_map.json').write_text(json.dumps(special_tokens_map))
  return str(d)


EOD_AS_ADDED_TOKEN = {'content': '<eod>', 'lstrip': False, 'rstrip': False, 'special': True}


@pytest.mark.parametrize('eos', [EOD_AS_ADDED_TOKEN, '</s>', None])
def test_yuan_tokenizer_dir_loads_and_encodes_eod_as_its_id(tmp_path, eos):
  """Yuan's runtime: eos '<eod>' whatever the files name (Yuan passes eos_token='<eod>'); a
  literal '<eod>' and every added token is its one id; other text as plain SentencePiece."""
  model = _yuan_like_model(tmp_path)
  config = {'tokenizer_class': 'LlamaTokenizer', 'add_bos_token': False, 'add_eos_token': False}
  d = _tokenizer_dir(tmp_path, model,
                     dict(config, eos_token=eos) if eos else config, {
                         'bos_token': '<s>',
                         'unk_token': '<unk>'
                     })
  tok = loader.load_tokenizer(d)
  sp = tok.sp
  eod = sp.piece_to_id('<eod>')
  assert tok.eod_id == eod and tok.sep_id == sp.piece_to_id('<sep>') and tok.newline_token == '<n>'
  assert len(sp.encode('<eod>')) > 1  # the plain model spells it out
  assert tok.encode('line<eod>some') == sp.encode('line') + [eod] + sp.encode('some')
  assert tok.decode(tok.encode('line<eod>some')) == 'line<eod>some'
  for t in ('<s>', '<unk>') + YUAN_ADDED_TOKENS:
    assert tok.encode(f'of{t}text') == sp.encode('of') + [tok.token_id(t)] + sp.encode('text'), t
    assert tok.decode(tok.encode(f'line{t}some\nof')) == f'line{t}some\nof'
  added = [t for t in YUAN_ADDED_TOKENS if t != '<sep>']
  assert [tok.token_id(t) for t in added] == list(range(80, 80 + len(added)))
  plain = ['line 7 of some <text>', 'two\nlines', '<eo d> <se', '']
  assert [tok.encode(t) for t in plain] == [sp.encode(t.replace('\n', '<n>')) for t in plain]
  texts = plain + ['x<eod><sep>y<eod>', '<mask>']
  assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_mixtral_tokenizer_dir_loads_as_llama(tmp_path):
  """A Llama-style model (no '<eod>'): '</s>' ends documents, '<s>' starts every text, and a
  literal '<s>' or '</s>' is its id (HF's special tokens)."""
  (tmp_path / 'm').mkdir()
  (tmp_path / 'mixtral.model').write_bytes(checkpoints.llama_style_tokenizer(tmp_path / 'm'))
  d = _tokenizer_dir(
      tmp_path, str(tmp_path / 'mixtral.model'), {
          'tokenizer_class': 'LlamaTokenizerFast',
          'add_bos_token': True,
          'add_eos_token': False,
          'legacy': True
      }, {
          'bos_token': '<s>',
          'eos_token': '</s>',
          'unk_token': '<unk>'
      })
  tok = loader.load_tokenizer(d)
  sp = tok.sp
  assert (tok.eod_id, tok.pad_id, tok.token_id('<s>')) == (2, 2, 1)
  assert tok.encode('line 3') == [1] + sp.encode('line 3')
  assert tok.encode('line</s>3', add_bos=False) == sp.encode('line') + [2] + sp.encode('3')
  assert tok.decode(tok.encode('line</s>3')) == 'line</s>3'  # the BOS encode adds dropped
  assert tok.decode([1, 1] + sp.encode('line')) == '<s>line'  # one written in the text kept


def test_tokenizer_dir_refusals(tmp_path):
  model = _yuan_like_model(tmp_path)
  d = _tokenizer_dir(tmp_path, model, {'tokenizer_class': 'GPT2Tokenizer'}, {})
  with pytest.raises(ValueError, match="tokenizer_class='GPT2Tokenizer'"):
    loader.load_tokenizer(d)
  (tmp_path / 'bare').mkdir()
  (tmp_path / 'bare' / 'tokenizer.model').write_bytes(open(model, 'rb').read())
  with pytest.raises(FileNotFoundError, match='tokenizer_config.json'):
    loader.load_tokenizer(str(tmp_path / 'bare'))
