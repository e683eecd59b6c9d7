# `make interop [RELEASE=dir]` (the top Makefile calls this file): LLaMA-Factory and LLaVA read the
# release folder with their own loading code, each in a throwaway venv of its own pins under
# .venv-interop/ (git-ignored; reused on rerun through its .installed stamp). Not part of `make test`.
#
# torch==2.13.0 goes in first and constraints.txt keeps it: any other torch request would pull a CUDA
# build. Neither venv gets torchvision (it does not work beside torch 2.13 here) nor, for LLaMA-Factory,
# torchaudio (PyPI's is a CUDA build that cannot load beside CPU torch): llamafactory is installed
# --no-deps, then its declared requirements less those two (deps.py), so pip's closing "llamafactory
# requires torchvision/torchaudio" complaint is expected. llava-torch is installed --no-deps beside
# llava-requirements.txt. Nothing is fetched from the Hugging Face hub: both checks build their
# tokenizer and image processor locally.
SHELL := bash
RELEASE ?= data/release
INTEROP_VENVS ?= .venv-interop
PYTHON ?= python3
LF := $(INTEROP_VENVS)/llamafactory
LLAVA := $(INTEROP_VENVS)/llava
PIP_C := -q -c interop/constraints.txt
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: interop

interop: $(LF)/.installed $(LLAVA)/.installed
	@test -f $(RELEASE)/dataset_info.json || { echo "no release at $(RELEASE) (make interop RELEASE=dir)"; exit 1; }
	@rc=0; \
	$(LF)/bin/python interop/llamafactory_check.py $(RELEASE) 2>&1 | tee $(INTEROP_VENVS)/llamafactory.log; \
	  [ $${PIPESTATUS[0]} = 0 ] || rc=1; \
	$(LLAVA)/bin/python interop/llava_check.py $(RELEASE) 2>&1 | tee $(INTEROP_VENVS)/llava.log; \
	  [ $${PIPESTATUS[0]} = 0 ] || rc=1; \
	echo "== interop: $(RELEASE)"; \
	tail -n1 $(INTEROP_VENVS)/llamafactory.log; tail -n1 $(INTEROP_VENVS)/llava.log; \
	exit $$rc

$(LF)/.installed: interop/interop.mk interop/constraints.txt interop/deps.py
	test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install -q torch==2.13.0
	$(@D)/bin/pip install $(PIP_C) --no-deps llamafactory==0.9.5
	$(@D)/bin/python interop/deps.py llamafactory torchvision torchaudio > $(@D)/requirements.txt
	$(@D)/bin/pip install $(PIP_C) -r $(@D)/requirements.txt
	touch $@

$(LLAVA)/.installed: interop/interop.mk interop/constraints.txt interop/llava-requirements.txt
	test -x $(@D)/bin/python || $(PYTHON) -m venv $(@D)
	$(@D)/bin/pip install -q torch==2.13.0
	$(@D)/bin/pip install $(PIP_C) --no-deps llava-torch==1.2.2.post1
	$(@D)/bin/pip install $(PIP_C) -r interop/llava-requirements.txt
	touch $@
