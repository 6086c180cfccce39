# `make demo` and `make test` do all the set-up on a fresh machine: a virtual
# environment, torch pinned exactly (CPU build here), the package and its C++ core built.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.nxd-installed

.PHONY: setup demo test test-python test-cpp test-gpu bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.hpp)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test,examples]"
	touch $@

BERT := examples/training/tp_dp_bert_hf_pretrain
BERT_DEMO := build/bert_demo
STDLIB = $(shell $(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')

# The seed's BERT pretraining tutorial, small: a data shard built from this machine's English text,
# a tiny BERT trained at TP=2 under torchrun, its sharded checkpoint merged into a Hugging Face model folder.
demo: setup
	$(BIN)/python $(BERT)/build_pretraining_shards.py --output_dir $(BERT_DEMO)/data \
	  --inputs $(wildcard /usr/share/common-licenses) $(STDLIB)/json $(STDLIB)/email $(STDLIB)/logging $(STDLIB)/unittest
	$(BIN)/torchrun --standalone --nproc_per_node=2 $(BERT)/tp_dp_bert_large_hf_pretrain_hdf5.py \
	  --tensor_parallel_degree 2 --model_config tiny --data_dir $(BERT_DEMO)/data --output_dir $(BERT_DEMO)/tp2 \
	  --steps_this_run 40 --max_steps 40 --warmup_steps 4 --lr 2e-3 --batch_size 8 --grad_accum_usteps 2 --checkpoint_every 20
	rm -rf $(BERT_DEMO)/merged
	$(BIN)/nxd checkpoint merge $(BERT_DEMO)/tp2/checkpoint $(BERT_DEMO)/merged
	cp $(BERT_DEMO)/tp2/config.json $(BERT_DEMO)/merged/
	HF_HUB_OFFLINE=1 $(BIN)/python -c "from transformers import BertForPreTraining; \
	  m = BertForPreTraining.from_pretrained('$(BERT_DEMO)/merged'); \
	  print(f'merged checkpoint: $(BERT_DEMO)/merged loads as BertForPreTraining ({m.num_parameters():,} parameters)')"
	@echo "loss plot: $(BERT_DEMO)/tp2/loss.png (per-step metrics: $(BERT_DEMO)/tp2/metrics.csv)"

test: setup test-cpp test-python

# The C++ engine's GoogleTest tests through ctest, in a normal, an AddressSanitizer and a
# ThreadSanitizer build (GoogleTest from Debian's libgtest-dev, installed when missing).
test-cpp: setup
	test -f /usr/include/gtest/gtest.h || (apt-get update && apt-get install -y libgtest-dev)
	command -v cmake >/dev/null || $(BIN)/python -m pip install -q cmake
	for sanitizer in none address thread; do \
	  PATH="$(CURDIR)/$(BIN):$$PATH" cmake -S . -B build/cpp-$$sanitizer -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	    -DNXD_BUILD_PYTHON_MODULE=OFF -DNXD_BUILD_TESTS=ON -DNXD_SANITIZER=$${sanitizer#none} \
	  && PATH="$(CURDIR)/$(BIN):$$PATH" cmake --build build/cpp-$$sanitizer -j2 \
	  && PATH="$(CURDIR)/$(BIN):$$PATH" ctest --test-dir build/cpp-$$sanitizer --output-on-failure -j2 \
	  || exit 1; \
	done

test-python: setup
	$(BIN)/python -m pytest tests -q

# The equivalence suite on a GPU (tests/gpu): one line and success where there is none. It does not
# depend on setup (which installs the pinned CPU torch): on a GPU machine give the interpreter that has
# CUDA torch and this package, e.g. `make test-gpu GPU_PYTHON=python3`; NXD_TEST_DEVICE=cpu runs it on CPU.
GPU_PYTHON ?= $(BIN)/python
test-gpu:
	@$(GPU_PYTHON) tests/gpu/device.py; status=$$?; \
	if [ $$status -eq 0 ]; then $(GPU_PYTHON) -m pytest tests/gpu -q; elif [ $$status -ne 3 ]; then exit $$status; fi

bench: setup
	$(BIN)/python benchmarks/tp_layers.py

clean:
	rm -rf build $(VENV)
