"""Yuan2.0-M32's five benchmarks as registered tasks: importing this package registers them."""
from yuanjax.evals.tasks import arc, gsm8k, humaneval, math, mmlu  # pylint: disable=unused-import
