from setuptools import find_packages, setup

# The repository root is the package: every folder with an __init__.py but the tests, examples and benchmarks.
PACKAGES = find_packages(".", exclude=["tests", "tests.*", "examples", "examples.*", "benchmarks", "benchmarks.*"])

setup(
    name="polyport",
    version="0.1.0",
    description="Hardware-portability compiler for DeepSeek-class models: ONNX in; CUDA, ROCm, Ascend and CPU out",
    python_requires=">=3.10",
    package_dir={"polyport": "."},
    packages=["polyport"] + [f"polyport.{p}" for p in PACKAGES],
    package_data={"polyport.targets.kernels.ascend": ["*.cpp.in", "*.md"]},
    install_requires=[
        "numpy>=1.26",
        "onnx==1.23.2",
        "ml_dtypes>=0.5",
        "click>=8.1",
        "apache-tvm==0.27.0.post1",
        # pinned: MetaSchedule segfaults serialising dtypes with apache-tvm-ffi 0.1.15.post2 (TVM_NOTES.md)
        "apache-tvm-ffi==0.1.14.post1",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3",
            "onnxruntime==1.31.1",
            "hypothesis==6.155.2",
            "matplotlib==3.11.2",       # `polyport report --plot` in CI's latency step
            "tokenizers==0.23.3",       # compile --tokenizer / generate --prompt
        ],
        "tokenizer": ["tokenizers==0.23.3"],   # compile --tokenizer / generate --prompt TEXT
        "export": [
            "torch==2.13.0",
            "transformers==5.23.0",
            "onnxscript==0.7.2",
        ],
    },
    entry_points={"console_scripts": ["polyport=polyport.cli:main"]},
)
