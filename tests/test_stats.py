import json
import subprocess
import sys

from yuanjax import config_lib
from yuanjax.stats import model_facts


def test_m32_facts_match_paper():
  facts = model_facts(config_lib.m32_model())
  assert abs(facts['total_params'] / 40e9 - 1) < 0.02
  assert abs(facts['active_params'] / 3.7e9 - 1) < 0.02
  assert abs(facts['forward_flops_per_token'] / 7.4e9 - 1) < 0.02


def test_active_params_follow_top_k():
  m = config_lib.m32_model()
  m.router.top_k = 4
  two = model_facts(config_lib.m32_model())
  four = model_facts(m)
  expert = 24 * 32 * 3 * 2048 * 8192
  assert four['total_params'] == two['total_params']
  assert four['active_params'] - two['active_params'] == expert * 2 // 32


def test_cli_prints_json_last_line():
  out = subprocess.run([
      sys.executable, '-m', 'yuanjax.stats', '--config', 'configs/yuan_m32.py',
      '--config.model.num_experts=16'
  ], capture_output=True, text=True, check=True)
  facts = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(facts) >= {'total_params', 'active_params', 'forward_flops_per_token'}
  assert abs(facts['total_params'] / 20.6e9 - 1) < 0.05
