"""common.py: the shared helpers (the question format and the submission checks are in test_competition.py)."""
import common


def test_write_csv_is_atomic_and_writes_a_bom_only_when_asked(tmp_path):
    common.write_csv(tmp_path / "a.csv", ["ID", "Answer"], [dict(ID="A", Answer="1", extra="x")])
    common.write_csv(tmp_path / "b.csv", ["ID", "Answer"], [dict(ID="A", Answer="1")], bom=True)
    assert (tmp_path / "a.csv").read_bytes() == b"ID,Answer\r\nA,1\r\n"
    assert (tmp_path / "b.csv").read_bytes() == b"\xef\xbb\xbfID,Answer\r\nA,1\r\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv", "b.csv"]


def test_model_targets_and_candidates_name_the_pipeline_folders():
    assert common.model_target("models/teacher-base") == "teacher"
    assert common.model_target("models/student-base/") == "student"
    assert common.model_target("Qwen/Qwen2.5-7B-Instruct") is None
    assert set(common.candidates()) == {"student", "teacher", "distilled"}


def test_write_meta_has_the_same_shape_for_every_stage(tmp_path):
    meta = common.write_meta(tmp_path / "meta.json", settings=dict(A=1), seconds=2.0, versions=dict(extra="9"))
    assert meta["settings"] == dict(A=1) and meta["seconds"] == 2.0
    assert meta["versions"]["extra"] == "9" and "torch" in meta["versions"]
    assert set(meta["machine"]) >= {"cpu", "cores", "flags", "cpu_dtype"}
