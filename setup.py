"""Install mlm_vs_clm: `pip install -e .` (add `[hf]` for Hugging Face conversion, `[st]` to load
exports in sentence-transformers, `[dev]` for tests, `[tpu]` to compile for TPU topologies on any
machine: `python -m mlm_vs_clm.aot --platform=tpu --topology=...`, `[beam]` to prepare corpora on
Apache Beam: `python -m mlm_vs_clm.data.prepare --runner=beam`, in an environment of its own, see
docs/data.md)."""

from setuptools import find_packages, setup

setup(
    name="mlm_vs_clm",
    version="0.1.0",
    description="Pretrain text encoders with MLM, CLM or CLM-then-MLM in JAX/Flax, then fine-tune and compare them.",
    packages=find_packages(include=["mlm_vs_clm", "mlm_vs_clm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6.0",
        "flax>=0.10.4",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11.0",
        "grain>=0.2.10",
        "sentencepiece>=0.2.0",
        "ml-collections>=1.0.0",
        "tensorflow-datasets>=4.9.7",
        "numpy>=1.26",
        "absl-py>=2.1.0",
        "etils[epath]>=1.7",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "pyarrow>=15",
        "scipy>=1.11",
        "matplotlib>=3.8",
        "seqeval>=1.2.2",
        "tokenizers>=0.19",
        "array-record>=0.5",  # the shards of prepared corpora (mlm_vs_clm/data/prepare)
    ],
    extras_require={
        # torch is pinned so that pip takes the CPU wheel instead of resolving a CUDA build.
        # transformers 5.3 added the native EuroBERT classes that encoder exports use.
        "hf": ["torch==2.13.0", "transformers>=5.3,<6", "safetensors>=0.4"],
        "st": ["torch==2.13.0", "transformers>=5.3,<6", "safetensors>=0.4", "sentence-transformers>=6.0"],
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.5", "portpicker>=1.6"],
        # The libtpu that `jax[tpu]` pins for jax 0.10.2 (~680 MB): TPU's compiler, no TPU needed.
        "tpu": ["libtpu==0.0.42.*"],
        # `data.prepare --runner=beam`; 2.78.0 is the release tested. It requires pyarrow<26 and
        # protobuf<7, below the main .venv's: install it in an environment of its own (docs/data.md).
        "beam": ["apache-beam>=2.78,<3"],
    },
)
