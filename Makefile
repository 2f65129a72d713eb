# make demo   - the main job (CPU by default): creates .venv, installs, trains + samples the vidgen
#               demo into out/ (DEMO_ARGS="--steps N --seed S --out DIR --device cuda --tiny";
#               PYTHON=python3.x picks the venv's Python, TORCH_PIP_ARGS adds pip arguments for
#               the torch install, e.g. "--index-url https://download.pytorch.org/whl/cpu")
# make test   - the test suite (CUDA tests run when a GPU is visible, skipped otherwise)
# make bench  - the pytest-benchmark suite (BENCH_ARGS=--quick for a smoke run) + the report
#               benchmarks/report/REPORT.md with plots (python -m vidgen_kernels.bench; JSON in
#               benchmarks/last.json; BENCH_ARGS takes its options and any pytest option)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vidgen-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)

.PHONY: demo test bench check-cuda check-triton check-asan check-portable check-gpu-torch env clean

$(STAMP): $(SOURCES) .ci/bootstrap.sh
	VENV=$(VENV) bash .ci/bootstrap.sh
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) -m vidgen demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest tests -rs -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) -m vidgen_kernels.bench --out benchmarks/report --json benchmarks/last.json $(BENCH_ARGS)

check-cuda:
	bash csrc/check_cuda_compile.sh

# the C++ CPU kernels' tests against an AddressSanitizer build of the extension (~6 min)
check-asan: $(STAMP)
	PYTHON=$(PY) bash csrc/check_cpu_asan.sh

# the C++ CPU kernels as Arm / macOS build them: the x86-64 baseline build's tests and a
# compile for aarch64 Linux and arm64 macOS with zig's clang (~3.5 min; CI runs it)
check-portable: $(STAMP)
	PYTHON=$(PY) bash csrc/check_cpu_portable.sh

# the GPU box's torch 2.11 (cu130) + triton 3.6 on this machine: build (CUDA kernels included)
# and the whole suite (~4.7 GB of wheels, ~15 min; .ci/check_gpu_torch.sh)
check-gpu-torch:
	bash .ci/check_gpu_torch.sh

# Triton kernels compiled ahead of time for GPU targets, no GPU needed
# (TRITON_AOT_ARGS="--arch 90 80 86" for the full check of every dtype and size)
TRITON_AOT_ARGS ?= --quick --arch 90
check-triton: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m vidgen_kernels.triton_kernels.aot_check $(TRITON_AOT_ARGS)

clean:
	rm -rf build $(VENV) vidgen_kernels/_C*.so vidgen_kernels/_C.cpu_features *.egg-info
