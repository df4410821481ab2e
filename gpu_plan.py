"""The memory plan of the GPU path: peak memory per stage for Qwen2.5 7B/14B/32B models in bf16 and nf4 on 24 GB and
80 GB cards, which combinations fit, and the throughput case for vLLM in 00's generation, on paper.

Reads the models' sizes (gpu_memory.QWEN25, their config.json numbers), the stages' settings (00_generate_pairs.py,
01_train_distillm.py, answering.py) and, for prompt and question lengths, the student's tokenizer and the corpus
chunks (`make data`; the Qwen2.5 models share one tokenizer). Every peak comes from gpu_memory's formulas: the ones
lm.load_teacher and the stages use to place the teacher, and that tests/test_gpu.py checks against tiny models
measured on the CPU. Writes reports/gpu-plan.md. Run by `make gpu-plan`.
"""
import argparse
import importlib
import random
import statistics

import answering
import common
import gpu_memory
import lm

# ----------------------------------------------------------------------------- settings
CARDS = {"24 GB": 24.0, "80 GB": 80.0}  # GiB the driver reports (RTX 4090 / L4: 23.99; A100 / H100 80 GB: 79.6-80)
STUDENT = "7B"  # the student the README suggests
TEACHERS = ("14B", "32B")
ANSWERERS = ("7B", "14B", "32B")  # 04: whichever candidate `make select` chooses
LEVELS = ("bf16", "bnb-nf4")
GPUS = {  # vendor datasheets: memory bandwidth GB/s, dense bf16 tensor TFLOPS
    "A100 80GB SXM": dict(bandwidth=2039, tflops=312),
    "RTX 4090": dict(bandwidth=1008, tflops=165),
}
HF_BANDWIDTH_SHARE = 0.5  # of the bandwidth HF generate's eager decode reaches (kernel launches, static batches)
VLLM_BANDWIDTH_SHARE = 0.8  # vLLM decode with CUDA graphs and paged attention
VLLM_MFU = 0.4  # share of peak tensor throughput vLLM reaches once decoding is compute-bound
VLLM_SEQUENCES = 128  # sequences vLLM decodes at once (continuous batching; max_num_seqs)
TEMPLATE_SAMPLE = 2000  # sampled chunks whose template questions give the typical question length
# -----------------------------------------------------------------------------

pairs_step = importlib.import_module("00_generate_pairs")
train_step = importlib.import_module("01_train_distillm")


def gib(n_bytes):
    return n_bytes / gpu_memory.GIB


def fits(peak_gib, card_gib):
    """The counted peak plus the CUDA context and headroom within the card."""
    return peak_gib + gpu_memory.CONTEXT_GIB + gpu_memory.HEADROOM_GIB <= card_gib


def level_name(level):
    return {"bf16": "bf16", "bnb-nf4": "nf4"}[level]


def pairs_rows(tokens, write_cap):
    """00: the bf16 student and the teacher on one card, or the teacher on a card of its own (FSKU_TEACHER_DEVICE)."""
    student, batch = gpu_memory.QWEN25[STUDENT], pairs_step.BATCH["cuda"]
    rows = []
    for name in TEACHERS:
        teacher = gpu_memory.QWEN25[name]
        work = pairs_step.working_memory_bytes(student, teacher, tokens, write_cap, batch)
        for level in LEVELS:
            weights = gpu_memory.weight_bytes(student) + gpu_memory.weight_bytes(teacher, level)
            models = f"student {STUDENT} bf16 + teacher {name} {level_name(level)}"
            rows.append(("00 pairs", models + ", one card", gib(weights + work)))
            alone = gpu_memory.weight_bytes(teacher, level) + work
            rows.append(("00 pairs", models + ", teacher on a second card (two cards; the fuller one's peak)",
                         gib(max(alone, gpu_memory.weight_bytes(student) + work))))
    return rows


def training_rows():
    """01: storing the teacher's top-k, training from it, and training beside a loaded teacher."""
    if not train_step.GRADIENT_CHECKPOINTING["cuda"]:
        raise SystemExit("gpu_plan: the training formula assumes gradient checkpointing on cuda (01's setting).")
    student, t = gpu_memory.QWEN25[STUDENT], train_step
    sequences = 2 * t.BATCH_PAIRS["cuda"]  # chosen and rejected sequences per step
    shape = (student, sequences, t.MAX_LENGTH, sequences * t.MAX_RESPONSE, t.LOSS_CHUNK, t.LORA_R)
    teachers = [(name, level, gpu_memory.QWEN25[name]) for name in TEACHERS for level in LEVELS]
    rows = [("01 --store-topk", f"teacher {name} {level_name(level)}", gib(gpu_memory.topk_store_bytes(
        config, level, t.TOPK_BATCH["cuda"], t.MAX_LENGTH, t.LOSS_CHUNK, t.TOPK))) for name, level, config in teachers]
    rows.append((f"01 training from the stored top-{t.TOPK}", f"student {STUDENT} bf16 + LoRA r{t.LORA_R}",
                 gib(gpu_memory.train_step_bytes(*shape, topk=t.TOPK))))
    rows += [("01 training, teacher loaded", f"student {STUDENT} bf16 + LoRA + teacher {name} {level_name(level)}",
              gib(gpu_memory.train_step_bytes(*shape, teacher=config, teacher_level=level)))
             for name, level, config in teachers]
    return rows


def answering_rows(tokens):
    """04: multiple-choice scoring and descriptive generation with the passage budget (the larger of the two)."""
    prompt = tokens["answer"] + answering.RAG_MAX_TOKENS
    rows = []
    for name in ANSWERERS:
        for level in LEVELS:
            config = gpu_memory.QWEN25[name]
            peak = max(gpu_memory.answering_bytes(config, level, answering.MC_BATCH, prompt),
                       gpu_memory.answering_bytes(config, level, answering.DESC_BATCH, prompt,
                                                  answering.DESC_MAX_NEW_TOKENS))
            rows.append(("04 answering", f"{name} {level_name(level)}", gib(peak)))
    return rows


def table(rows):
    lines = ["| stage | models | peak GiB | " + " | ".join(CARDS) + " |", "|---|---|---|" + "---|" * len(CARDS)]
    for stage, models, peak in rows:
        cells = [f"fits ({card - peak - gpu_memory.CONTEXT_GIB - gpu_memory.HEADROOM_GIB:.1f} GiB spare)"
                 if fits(peak, card) else "**no**" for card in CARDS.values()]
        lines.append(f"| {stage} | {models} | {peak:.1f} | " + " | ".join(cells) + " |")
    return lines


def fitting_lines(rows):
    """Per card and stage, the model combinations that fit."""
    lines = []
    for card, size in CARDS.items():
        parts = []
        for stage in dict.fromkeys(r[0] for r in rows):
            ok = [models for s, models, peak in rows if s == stage and fits(peak, size)]
            parts.append(f"{stage}: " + ("; ".join(ok) if ok else "**nothing**"))
        lines.append(f"- **{card}**: " + ". ".join(parts) + ".")
    return lines


def typical_question_tokens(tokenizer, chunks):
    """Median tokens of the template multiple-choice questions the corpus gives (4 and 5 options): the length a
    teacher-written question is planned at."""
    pool, rng = pairs_step.template_pool(chunks), random.Random(common.SEED)
    texts = []
    for chunk in pairs_step.pick_chunks(chunks, TEMPLATE_SAMPLE):
        job = dict(id=f"{chunk['id']}-mc", chunk=chunk, kind="mc", n_options=rng.choice(pairs_step.OPTION_COUNTS))
        texts.append(pairs_step.template_question(job, pool, rng))
    lengths = [len(ids) for ids in tokenizer([t for t in texts if t], add_special_tokens=False).input_ids]
    return int(statistics.median(lengths)) if lengths else 0


def decode_seconds(weights, kv_bytes_per_token, params, tokens, sequences, context, gpu, bandwidth_share, mfu=None):
    """Seconds to decode `tokens` tokens `sequences` at a time: a step reads the weights and the batch's KV cache
    (context tokens each) at bandwidth_share of the bandwidth, and with mfu also costs 2 x params FLOPs per sequence."""
    step = (weights + sequences * context * kv_bytes_per_token) / (gpu["bandwidth"] * 1e9 * bandwidth_share)
    if mfu:
        step = max(step, 2 * params * sequences / (gpu["tflops"] * 1e12 * mfu))
    return tokens / sequences * step


def throughput_lines(tokens, write_cap, question_tokens):
    """The vLLM case on paper: teacher decoding of 00 on an A100, HF generate's static batches vs continuous
    batching."""
    p, gpu = pairs_step, GPUS["A100 80GB SXM"]
    chunks = p.N_CHUNKS["cuda"]
    per_chunk = question_tokens + p.WRITE_MAX_NEW_TOKENS["desc"] + p.ANSWER_MAX_NEW_TOKENS
    total = chunks * per_chunk
    lines = ["## Generation at scale: vLLM for 00, on paper", "",
             f"00 on a GPU writes questions with the teacher from {chunks} chunks (N_CHUNKS cuda), kinds "
             f"{'/'.join(p.KINDS['cuda'])}: per chunk a multiple-choice question (typically {question_tokens} tokens, "
             f"the median template question over {TEMPLATE_SAMPLE} sampled chunks; cap {write_cap}), a descriptive one "
             f"(cap {p.WRITE_MAX_NEW_TOKENS['desc']}) and a descriptive answer (cap {p.ANSWER_MAX_NEW_TOKENS}): about "
             f"**{total / 1e6:.2f} M teacher tokens** decoded (caps taken for the descriptive parts). Decoding is "
             f"bandwidth-bound at small batches: a step reads every weight once. Assumed: HF generate reaches "
             f"{HF_BANDWIDTH_SHARE:.0%} of the bandwidth and runs static batches of BATCH = {p.BATCH['cuda']} until "
             f"the longest row stops (planned at the cap); vLLM reaches {VLLM_BANDWIDTH_SHARE:.0%}, keeps "
             f"{VLLM_SEQUENCES} sequences in flight and is compute-bound beyond that at {VLLM_MFU:.0%} of the "
             f"tensor peak. {next(iter(GPUS))}: {gpu['bandwidth']} GB/s, {gpu['tflops']} TFLOPS bf16.", "",
             "The nf4 rows count the bytes a step reads; bitsandbytes dequantizes on the fly, which often makes "
             "4-bit decoding no faster than bf16 in practice.", "",
             "| teacher | HF generate, batch %d (min) | vLLM, %d sequences (min) |" % (p.BATCH["cuda"], VLLM_SEQUENCES),
             "|---|---|---|"]
    for name in TEACHERS:
        for level in LEVELS:
            config = gpu_memory.QWEN25[name]
            weights, kv = gpu_memory.weight_bytes(config, level), gpu_memory.kv_cache_bytes(config, 1)
            params = gpu_memory.weight_bytes(config, "fp32") / 4
            static = chunks * (write_cap + p.WRITE_MAX_NEW_TOKENS["desc"] + p.ANSWER_MAX_NEW_TOKENS)
            hf = decode_seconds(weights, kv, params, static, p.BATCH["cuda"], tokens["write"], gpu,
                                HF_BANDWIDTH_SHARE)
            vllm = decode_seconds(weights, kv, params, total, VLLM_SEQUENCES, tokens["write"], gpu,
                                  VLLM_BANDWIDTH_SHARE, VLLM_MFU)
            lines.append(f"| {name} {level_name(level)} | {hf / 60:.0f} | {vllm / 60:.0f} |")
    lines += ["", "vLLM is not in the code: its PyPI wheel (0.33.0, checked with `pip install vllm --dry-run "
              "--no-deps`) is the CUDA build and pins torch 2.14.0 against this pipeline's 2.13.0; its CPU wheels are "
              "published on GitHub releases only (vLLM's CPU installation page), not on PyPI, so no test here "
              "installs or runs it. A GPU user who wants it replaces `sample` in "
              "00_generate_pairs.py with `vllm.LLM(model).generate(prompts, SamplingParams(temperature, top_p, "
              "max_tokens))` on the rendered prompts; the rest of 00 (checking, answering, checkpoints) stays.", ""]
    return lines


def report(tokenizer, chunks, command):
    """reports/gpu-plan.md as lines."""
    write_cap = pairs_step.mc_write_cap(tokenizer, chunks)
    tokens = pairs_step.prompt_tokens(tokenizer, write_cap)
    t = train_step
    rows = pairs_rows(tokens, write_cap) + training_rows() + answering_rows(tokens)
    lines = ["# GPU memory plan", "", f"Produced by `{command}` (gpu_plan.py), computed, not measured on a GPU: "
             "gpu_memory.py's formulas on the Qwen2.5-Instruct config.json numbers (gpu_memory.QWEN25) and the "
             "pipeline's cuda settings. tests/test_gpu.py checks each formula against the peak tensor memory of tiny "
             "models measured on the CPU (it must bound the measured peak and stay within 25% of it); weights are "
             "exact, the nf4 weights include bitsandbytes' scales.", "",
             f"A card fits a stage when the peak plus the CUDA context ({gpu_memory.CONTEXT_GIB} GiB) and allocator "
             f"headroom ({gpu_memory.HEADROOM_GIB} GiB) is within it. Settings: 00 batch {pairs_step.BATCH['cuda']} "
             f"chunks, writer prompt {tokens['write']} tokens, multiple-choice cap {write_cap} new tokens "
             f"(mc_write_cap), answering prompt {tokens['answer']} tokens; 01 {2 * t.BATCH_PAIRS['cuda']} sequences "
             f"of {t.MAX_LENGTH} tokens per step ({t.BATCH_PAIRS['cuda']} pairs, accumulation "
             f"{t.GRAD_ACCUM['cuda']}), loss chunk {t.LOSS_CHUNK}, gradient checkpointing, top-{t.TOPK}, top-k "
             f"store batch {t.TOPK_BATCH['cuda']} sequences; 04 batches {answering.MC_BATCH}/{answering.DESC_BATCH}, "
             f"prompt {tokens['answer']} + {answering.RAG_MAX_TOKENS} passage tokens, "
             f"{answering.DESC_MAX_NEW_TOKENS} new tokens.", ""]
    lines += table(rows) + ["", "What fits, per card size:", ""] + fitting_lines(rows)
    lines += ["", "Routes: `make topk` stores the teacher's top-k once (the teacher alone on the card, at the first of "
              f"lm.TEACHER_LEVELS {', '.join(lm.TEACHER_LEVELS)} that fits), then `make distill` trains with no "
              "teacher loaded (TEACHER_SOURCE cuda = topk). 00 needs both models: on a 24 GB card only with the "
              "teacher on a second card (FSKU_TEACHER_DEVICE=cuda:1) or spread over the GPUs "
              "(FSKU_TEACHER_DEVICE=auto).", ""]
    return lines + throughput_lines(tokens, write_cap, typical_question_tokens(tokenizer, chunks))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(common.REPORTS / "gpu-plan.md"))
    parser.add_argument("--command", default="make gpu-plan")
    args = parser.parse_args()
    tokenizer = lm.load_tokenizer(common.STUDENT_MODEL)
    lines = report(tokenizer, pairs_step.load_chunks(tokenizer), args.command)
    common.write_text(args.out, "\n".join(lines) + "\n")
    print(f"gpu_plan: wrote {args.out}")


if __name__ == "__main__":
    main()
