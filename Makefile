# `make demo` and `make test` do all the set-up on a fresh machine: a virtual
# environment, torch pinned exactly (CPU build here), the package and its C++ core built.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0
STAMP := $(VENV)/.nxd-installed

.PHONY: setup demo test test-python test-cpp bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml CMakeLists.txt $(wildcard csrc/*.cpp csrc/*.h csrc/*.hpp)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4"
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

demo: setup
	$(BIN)/torchrun --standalone --nproc_per_node=2 examples/tp_mlp_demo.py --tensor_parallel_degree 2

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

bench: setup
	$(BIN)/python benchmarks/tp_layers.py

clean:
	rm -rf build $(VENV)
