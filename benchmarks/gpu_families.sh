#!/bin/bash
# The model families and the sampler's features on one GPU (repository root, device machine):
#   bash benchmarks/gpu_families.sh
# tests/gpu/test_families_gpu.py: each family's tiny checkpoint in bf16 against HF on the GPU,
# min_tokens, prompt_logprobs, structured outputs, and the family presets at real size.
# Structured outputs need xgrammar (cp312 wheels of it and of pydantic, pydantic-core,
# annotated-types and typing-inspection, which the device lacks, carried in .carry/)
# and the default model's tokenizer (.carry/smollm2-tokenizer: its config and tokenizer files,
# copied from a converted default model directory; the test draws dummy weights). To prepare
# .carry/ on a machine with the registry (the device has no network):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .carry xgrammar==0.1.29 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
#   mkdir -p .carry/smollm2-tokenizer && cp "$(python -c 'from vattention.models.gguf_import import \
#       default_model_dir as d; print(d())')"/{config,generation_config,tokenizer,tokenizer_config}.json .carry/smollm2-tokenizer/
# then run it through the device tool with carry [".carry"].
set -u
. benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -s -p no:cacheprovider -rs tests/gpu/test_families_gpu.py "$@" 2>&1 | tr '\r' '\n' | grep -v "Processed prompts\|Writing model shards\|^\s*$"
