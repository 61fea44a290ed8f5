"""Data for yuanjax: SentencePiece tokenizer, token shards, and the grain input pipeline.

  python -m yuanjax.data --help            # tokenizer | prepare | default | inspect

Modules: `corpus` (reading .txt/.jsonl(.gz/.zst)/.parquet inputs, the stdlib default corpus),
`storage` (local paths and gs:// URLs, the GCS emulator), `tokenizer` (`Tokenizer`, training),
`prepare` (writing/reading shards, `ensure_default_data`), `pipeline` (`data_config`,
`make_datasets`, `make_pipeline`, mixtures), `streams` (a process's input streams),
`beam_prepare` (prepare as an Apache Beam pipeline; its own environment). The shard writer is
`yuanjax.data.prepare.prepare` (not re-exported: it would shadow its module).
"""
from yuanjax.data.corpus import InputError
from yuanjax.data.pipeline import BATCH_KEYS, SpecialIds, data_config, make_datasets, make_pipeline
from yuanjax.data.prepare import ShardedDocuments, ensure_default_data
from yuanjax.data.tokenizer import SPECIAL_SYMBOLS, Tokenizer, train_tokenizer

__all__ = [
    'BATCH_KEYS',
    'InputError',
    'SPECIAL_SYMBOLS',
    'ShardedDocuments',
    'SpecialIds',
    'Tokenizer',
    'data_config',
    'ensure_default_data',
    'make_datasets',
    'make_pipeline',
    'train_tokenizer',
]
