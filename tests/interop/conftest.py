"""The interop tests' checkpoints (tests/interop/checkpoints.py), each built once per session."""
import pytest

from tests.interop import checkpoints


@pytest.fixture(scope='session')
def hf_checkpoint(tmp_path_factory):
  """hf_checkpoint(family, kind) -> checkpoints.Checkpoint, written and converted on first use."""
  built = {}

  def get(family: str, kind: str) -> checkpoints.Checkpoint:
    if (family, kind) not in built:
      root = tmp_path_factory.mktemp(f'{family}-{kind}')
      built[family, kind] = checkpoints.build(family, kind, root)
    return built[family, kind]

  return get
