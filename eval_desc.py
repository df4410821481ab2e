"""Choices for the descriptive answers, measured on the development set: instruction, length, repetition blocking.

Reads the 54 descriptive development questions and their references (scoring.dev_question_set; never used in a
prompt) and the answering model of selection.json (or --model). Each VARIANTS entry generates one answer per
question (checkpointed in outputs/eval_desc/<model>-<variant>.jsonl); each is then cut to 1, 2 and 3 sentences
(answering.clean_description), with and without the question's subject in front (DESC_RESTATE), and scored
with scoring.py beside two baselines: the question itself as the answer (the echo) and the reference. Also counts
answers that repeat a sentence. Writes reports/desc.md. Run by
`make desc-report`; copy the winner into answering.py's DESC_* settings and common.DESC_INSTRUCTION.
"""
import argparse
import re
import time
from pathlib import Path

import answering
import common
import competition
import lm
import scoring

# ----------------------------------------------------------------------------- settings
PLAIN = "다음 질문에 핵심 용어를 포함해 2~3문장의 한국어로 간결하게 답하세요."  # the instruction before terms-first
VARIANTS = {  # name -> instruction (None: common.DESC_INSTRUCTION, "terms-first") and generation options
    "plain": dict(instruction=PLAIN, options=dict()),
    "no-repeat": dict(instruction=PLAIN, options=dict(no_repeat_ngram_size=4, repetition_penalty=1.1)),
    "terms-first": dict(instruction=None, options=dict()),
}
SENTENCES = [1, 2, 3]  # answers cut to this many sentences (answering.DESC_MAX_SENTENCES is the default cut)
OUT = common.OUTPUTS / "eval_desc"
# -----------------------------------------------------------------------------


def desc_questions():
    """(parsed descriptive development questions, labels by id)."""
    rows, labels = scoring.dev_question_set(common.SHARED / "eval")
    questions = [competition.parse_question(r["ID"], r["Question"]) for r in rows]
    return [q for q in questions if q.kind == "desc"], {r["ID"]: r for r in labels}


def generate_variant(model, tokenizer, questions, variant, path):
    """Raw answers {id: text} of one variant, generated for the questions not yet in its checkpoint."""
    done = {i: r["raw"] for i, r in lm.read_records(path).items()}
    todo = [q for q in questions if q.id not in done]
    spec = VARIANTS[variant]
    for start in range(0, len(todo), answering.DESC_BATCH):
        chunk = todo[start:start + answering.DESC_BATCH]
        prompts = [lm.render(tokenizer, common.desc_messages(q.text, instruction=spec["instruction"]))
                   for q in chunk]
        texts = lm.generate(model, tokenizer, prompts, answering.DESC_MAX_NEW_TOKENS, answering.DESC_BATCH,
                            **spec["options"])
        answering.append_records(path, [dict(id=q.id, raw=t) for q, t in zip(chunk, texts)])
        done.update((q.id, t) for q, t in zip(chunk, texts))
    return done


def repeats_a_sentence(text):
    """True when a sentence (or a clause of 8+ characters) occurs twice in the answer."""
    parts = [p.strip() for p in re.split(r"(?<=[.!?다요])\s+|,\s*", text) if len(p.strip()) >= 8]
    return len(parts) != len(set(parts))


def row(name, answers, labels):
    s = scoring.score(answers, labels)
    mean_chars = sum(len(a) for a in answers.values()) / len(answers)
    repeated = sum(repeats_a_sentence(a) for a in answers.values())
    return (f"| {name} | {s['desc_score']:.4f} | {s['cosine']:.4f} | {s['keyword_recall']:.4f} | {mean_chars:.0f} | "
            f"{repeated} |"), s


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="candidate or model folder (default: selection.json's)")
    parser.add_argument("--out", type=Path, default=common.REPORTS / "desc.md")
    parser.add_argument("--command", default="make desc-report")
    args = parser.parse_args()
    config = answering.chosen()
    model_id = answering.Config(candidate=args.model).model if args.model else config.model
    questions, labels = desc_questions()
    device = lm.pick_device()
    tokenizer = lm.load_tokenizer(model_id)
    model = lm.load_model(model_id, device, lm.pick_dtype(device, level=config.level), level=config.level)
    OUT.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"\W+", "-", str(model_id)).strip("-")
    lines = ["# Descriptive answers: instruction, length, repetition", "",
             f"Produced by `{args.command}` with `{model_id}` ({config.level}) on {len(questions)} development "
             f"questions. Score = {scoring.W_COS} × cosine ({scoring.encoder_name()}) + {scoring.W_KW} × keyword "
             "recall. The echo baseline answers each question with the question itself; the reference row scores "
             "the reference answers against themselves (cosine 1) and shows how few keywords they contain.", "",
             "| answers | descriptive score | cosine | keyword recall | characters | repeating a sentence |",
             "|---|---|---|---|---|---|"]
    lines.append(row("echo: the question itself", {q.id: q.text for q in questions}, labels)[0])
    lines.append(row("reference answers", {q.id: labels[q.id]["Answer"] for q in questions}, labels)[0])
    for variant in VARIANTS:
        t0 = time.time()
        raw = generate_variant(model, tokenizer, questions, variant, OUT / f"{tag}-{variant}.jsonl")
        print(f"eval_desc: {variant} in {time.time() - t0:.0f} s")
        for n in SENTENCES:
            for restate in (False, True):
                answers = {q.id: answering.clean_description(raw[q.id], q.text, n, restate) for q in questions}
                name = f"{variant}, {n} sentence{'s' if n > 1 else ''}" + (", subject first" if restate else "")
                lines.append(row(name, answers, labels)[0])
    lines += ["", f"Instructions: plain = \"{PLAIN}\"; terms-first = `common.DESC_INSTRUCTION` = "
              f"\"{common.DESC_INSTRUCTION}\". no-repeat = `no_repeat_ngram_size=4, repetition_penalty=1.1`. "
              "Subject first = \"<the question without its closing request>: <answer>\" (answering.DESC_RESTATE).",
              f"Default (answering.py): terms-first, {answering.DESC_MAX_SENTENCES} sentence(s)"
              + (", subject first." if answering.DESC_RESTATE else "."), ""]
    common.write_text(args.out, "\n".join(lines))
    print(f"eval_desc: wrote {args.out}")


if __name__ == "__main__":
    main()
