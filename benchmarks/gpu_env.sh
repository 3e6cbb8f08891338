# Sourced by the GPU scripts (device machine, repository root): PYTHONPATH on src/, plus what the
# structured-output tests need from .carry/ (benchmarks/gpu_families.sh says how to prepare it):
# the xgrammar wheels installed aside, and the default model's tokenizer directory.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
if ls .carry/xgrammar-*.whl >/dev/null 2>&1; then
    pip install -q --no-deps --target /tmp/xgrammar .carry/*.whl 2>&1 | grep -v "as the 'root' user"
    export PYTHONPATH=$PYTHONPATH:/tmp/xgrammar
fi
[ -d .carry/smollm2-tokenizer ] && export VATTENTION_GPU_TOKENIZER_DIR=$PWD/.carry/smollm2-tokenizer
