"""``rglf ingest`` (pipeline/ingest.py): LLaVA JSON/JSONL -> samples + errors tables."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rglf.cli import app
from rglf.model.tables import ERRORS_SCHEMA, SAMPLES_SCHEMA
from rglf.model.toy.task import ToyDatasetConfig, write_dataset
from rglf.pipeline.ingest import IngestConfig, IngestError, run_ingest


def read(folder: Path, pattern: str = "*.parquet") -> list[dict]:
    files = sorted(folder.glob(pattern))
    return [row for f in files for row in pq.read_table(f).to_pylist()]


def conv(*texts: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(texts)]


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_toy_dataset_round_trips_with_its_own_source_and_split(tmp_path):
    data = tmp_path / "data"
    write_dataset(data, ToyDatasetConfig(n_samples=10, seed=3))
    files = [data / f"{s}.json" for s in ("train", "val", "test")]
    report = run_ingest(IngestConfig(inputs=files, image_root=data, out=tmp_path / "run"), log=lambda _: None)

    rows = read(tmp_path / "run" / "samples")
    records = [r for f in files for r in json.loads(f.read_text())]
    assert report.samples == len(rows) == 10 and report.rejected == 0 and report.exit_code == 0
    assert [r["sample_id"] for r in rows] == [r["id"] for r in records]  # stable ids, input order
    assert [(r["source"], r["split"], r["image"]) for r in rows] == [
        (r["source"], r["split"], r["image"]) for r in records
    ]
    assert all(r["image_root"] == str(data) and (data / r["image"]).is_file() for r in rows)
    assert rows[0]["turns"] == [{"role": "human", "text": records[0]["conversations"][0]["value"]},
                                {"role": "gpt", "text": records[0]["conversations"][1]["value"]}]
    assert pq.read_schema(next((tmp_path / "run" / "samples").glob("*.parquet"))).equals(SAMPLES_SCHEMA)
    # nothing rejected: the errors folder still holds one schema'd, 0-row file (queries find an empty table)
    [errors] = (tmp_path / "run" / "errors").glob("*.parquet")
    assert pq.read_schema(errors).equals(ERRORS_SCHEMA) and pq.read_metadata(errors).num_rows == 0
    assert json.loads((tmp_path / "run" / "ingest.json").read_text())["counts"]["samples"] == 10


def test_invalid_records_become_error_rows_and_valid_ones_are_kept(tmp_path):
    good = {"id": "a", "image": "x.png", "conversations": conv("<image>\nQ?", "A")}
    records = [
        good,
        {"id": "multi", "image": "y.png", "conversations": conv("What is <image> this?", "a cat", "Colour?", "black")},
        {"id": "text", "conversations": conv("Hello?", "hi")},  # text-only
        {"id": 7, "conversations": conv("int id?", "yes")},  # integer ids are kept, as decimal strings
        {"image": "z.png", "conversations": conv("<image>\nQ?", "A")},  # no id
        {"id": "a", "image": "other.png", "conversations": conv("<image>\nQ2?", "B")},  # duplicate id
        {"id": "empty", "image": "e.png", "conversations": conv("<image>\nQ?", "   ")},
        '{"id": "broken", "conversations": [',  # not JSON
        {"id": "noimg", "conversations": conv("<image>\nQ?", "A")},  # placeholder but no image
        {"id": "open", "conversations": conv("Q?", "A", "and then?")},  # ends with a human turn
        {"id": "twice", "image": "t.png", "conversations": conv("<image> <image> Q?", "A")},
        ["not", "an", "object"],
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    report = run_ingest(IngestConfig(inputs=[path], image_root=tmp_path, out=tmp_path / "run"), log=lambda _: None)

    rows = {r["sample_id"]: r for r in read(tmp_path / "run" / "samples")}
    assert set(rows) == {"a", "multi", "text", "7"}
    assert rows["a"]["image"] == "x.png"  # the FIRST copy of a duplicate id is kept
    assert rows["text"]["image"] is None and rows["text"]["image_root"] is None
    assert len(rows["multi"]["turns"]) == 4 and rows["multi"]["turns"][0]["text"] == "What is <image> this?"
    assert {r["source"] for r in rows.values()} == {"mixed"}  # the file stem by default

    errors = read(tmp_path / "run" / "errors", "ingest-*.parquet")
    by_code = {e["code"]: e for e in errors}
    assert sorted(by_code) == sorted(
        ["missing_id", "duplicate_id", "empty_answer", "invalid_json", "image_placeholder_without_image",
         "bad_conversation", "several_placeholders", "not_an_object"]
    )
    assert len(errors) == report.rejected == 8 and report.exit_code == 3
    assert all(e["stage"] == "ingest" and str(path) in e["reason"] for e in errors)  # names the input
    assert by_code["missing_id"]["sample_id"] is None and "no 'id'" in by_code["missing_id"]["reason"]
    assert by_code["duplicate_id"]["sample_id"] == "a" and f"{path}:1" in by_code["duplicate_id"]["reason"]
    assert f"{path}:6" in by_code["duplicate_id"]["reason"]
    assert "empty" in by_code["empty_answer"]["reason"]
    assert pq.read_schema(next((tmp_path / "run" / "errors").glob("ingest-*.parquet"))).equals(ERRORS_SCHEMA)


def test_source_and_split_defaults_and_several_inputs(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps([
        {"id": "1", "conversations": conv("Q?", "A")},
        {"id": "2", "conversations": conv("Q?", "A"), "source": "own", "split": "val"},
    ]))
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "3", "conversations": conv("Q?", "A")},
                                          {"id": "1", "conversations": conv("Q?", "A")}])
    cfg = IngestConfig(inputs=[a, b], image_root=tmp_path, out=tmp_path / "run", split="train", rows_per_part=2)
    report = run_ingest(cfg, log=lambda _: None)
    rows = read(tmp_path / "run" / "samples")
    assert [(r["sample_id"], r["source"], r["split"]) for r in rows] == [
        ("1", "a", "train"), ("2", "own", "val"), ("3", "b", "train")
    ]
    assert report.sample_parts == 2  # rows_per_part
    assert report.rejected_by_code == {"duplicate_id": 1}  # duplicates are found across files

    cfg = IngestConfig(inputs=[a], image_root=tmp_path, out=tmp_path / "run2", source="given")
    run_ingest(cfg, log=lambda _: None)
    assert [r["source"] for r in read(tmp_path / "run2" / "samples")] == ["given", "own"]


def test_existing_samples_are_replaced_only_with_force(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": str(i), "conversations": conv("Q?", "A")} for i in range(5)])
    out = tmp_path / "run"
    run_ingest(IngestConfig(inputs=[path], image_root=tmp_path, out=out, rows_per_part=2), log=lambda _: None)
    assert len(list((out / "samples").glob("*.parquet"))) == 3
    with pytest.raises(IngestError, match="--force"):
        run_ingest(IngestConfig(inputs=[path], image_root=tmp_path, out=out), log=lambda _: None)
    write_jsonl(path, [{"id": "only", "conversations": conv("Q?", "A")}])
    run_ingest(IngestConfig(inputs=[path], image_root=tmp_path, out=out, force=True), log=lambda _: None)
    assert [r["sample_id"] for r in read(out / "samples")] == ["only"]  # no stale parts left
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no staging leftovers


def test_cli_exit_status_says_whether_records_were_rejected(tmp_path):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"id": "1", "conversations": conv("Q?", "A")}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"conversations": conv("Q?", "A")}])
    runner = CliRunner()
    result = runner.invoke(app, ["ingest", str(ok), "--image-root", str(tmp_path), "--run", str(tmp_path / "r1")])
    assert result.exit_code == 0, result.output
    assert "1 samples" in result.output
    result = runner.invoke(app, ["ingest", str(ok), str(bad), "--image-root", str(tmp_path), "--run", str(tmp_path / "r2")])
    assert result.exit_code == 3, result.output
    assert "missing_id: 1" in result.output
    result = runner.invoke(app, ["ingest", str(tmp_path / "nope.json"), "--image-root", str(tmp_path), "--run", str(tmp_path / "r3")])
    assert result.exit_code == 2 and "does not exist" in result.output


# --------------------------------------------------------------------------------------
# Bad bytes, odd layouts, empty inputs (issue 13, case 6), streaming (issue 15)
# --------------------------------------------------------------------------------------

GOOD = [{"id": f"g{i}", "conversations": conv("Q?", f"answer {i}")} for i in range(3)]


def ingest(tmp_path: Path, *files: Path, **kwargs) -> tuple:
    run = tmp_path / "run"
    report = run_ingest(IngestConfig(inputs=list(files), image_root=tmp_path, out=run, force=True, **kwargs),
                        log=lambda _: None)
    errors = read(run / "errors", "ingest-*.parquet")
    return report, [r["sample_id"] for r in read(run / "samples")], {e["code"]: e for e in errors}


def test_undecodable_bytes_cost_only_their_record(tmp_path):
    lines = [json.dumps(r).encode() for r in GOOD]
    bad = json.dumps({"id": "bad", "conversations": conv("Q?", "XX")}).encode().replace(b"XX", b"caf\xe9")
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(b"\n".join([lines[0], bad, lines[1], lines[2]]) + b"\n")
    report, ids, errors = ingest(tmp_path, jsonl)
    assert ids == ["g0", "g1", "g2"] and report.rejected == 1
    assert f"{jsonl}:2" in errors["invalid_utf8"]["reason"] and "turn 1" in errors["invalid_utf8"]["reason"]
    listed = tmp_path / "latin1.json"
    listed.write_bytes(b"[" + b",\n".join([lines[0], bad, lines[1], lines[2]]) + b"]")
    report, ids, errors = ingest(tmp_path, listed)
    assert ids == ["g0", "g1", "g2"] and f"{listed}[1]" in errors["invalid_utf8"]["reason"]
    assert "\ufffd" in errors["invalid_utf8"]["detail"]  # stored readable, not as raw bytes


def test_byte_order_marks_and_top_level_objects(tmp_path):
    bom_list = tmp_path / "bom.json"
    bom_list.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD, indent=2).encode())
    report, ids, _ = ingest(tmp_path, bom_list)
    assert ids == ["g0", "g1", "g2"] and report.rejected == 0  # a list, not three hundred bad JSONL lines
    bom_lines = tmp_path / "bom.jsonl"
    bom_lines.write_bytes(b"\xef\xbb\xbf" + b"\n".join(json.dumps(r).encode() for r in GOOD))
    assert ingest(tmp_path, bom_lines)[1] == ["g0", "g1", "g2"]
    one = tmp_path / "one.json"
    one.write_text(json.dumps(GOOD[0], indent=2))  # one pretty-printed record
    assert ingest(tmp_path, one)[1:] == (["g0"], {})
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": GOOD}, indent=2))
    with pytest.raises(IngestError, match=r"wrapped.json: the file holds a JSON object at line 1, column 1 that is not"):
        ingest(tmp_path, wrapped)
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(json.dumps(GOOD).encode("utf-16"))
    with pytest.raises(IngestError, match="UTF-16"):
        ingest(tmp_path, utf16)
    binary = tmp_path / "image.json"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(IngestError, match="not JSON or JSONL"):
        ingest(tmp_path, binary)


def test_deep_nesting_and_broken_list_elements_are_error_rows(tmp_path):
    deep = '{"id": "deep", "conversations": ' + "[" * 100_000 + "]" * 100_000 + "}"
    broken = '{"id": "broken", "conversations": [{"from": "human" "value": "no comma"}]}'
    listed = tmp_path / "mixed.json"
    listed.write_text("[" + ",".join([json.dumps(GOOD[0]), deep, broken, json.dumps(GOOD[1])]) + "]")
    report, ids, errors = ingest(tmp_path, listed)
    assert ids == ["g0", "g1"] and report.records == 4
    assert f"{listed}[1]" in errors["too_deep"]["reason"]
    assert f"{listed}[2]" in errors["invalid_json"]["reason"] and "line 1" in errors["invalid_json"]["reason"]
    lines = tmp_path / "mixed.jsonl"
    lines.write_text("\n".join([json.dumps(GOOD[0]), deep, json.dumps(GOOD[1])]) + "\n")
    report, ids, errors = ingest(tmp_path, lines)
    assert ids == ["g0", "g1"] and f"{lines}:2" in errors["too_deep"]["reason"]
    truncated = tmp_path / "truncated.json"
    truncated.write_text("[" + json.dumps(GOOD[0]) + "," + json.dumps(GOOD[1])[:-10])
    report, ids, errors = ingest(tmp_path, truncated)
    assert ids == ["g0"] and "ends inside this record" in errors["invalid_json"]["reason"]


@pytest.mark.parametrize("content", [b"", b"  \n", b"[]", b"\xef\xbb\xbf[ ]\n"])
def test_an_empty_input_is_a_warning_and_exit_3(tmp_path, content):
    path = tmp_path / "empty.json"
    path.write_bytes(content)
    result = CliRunner().invoke(app, ["ingest", str(path), "--image-root", str(tmp_path), "--run", str(tmp_path / "r")])
    assert result.exit_code == 3, result.output
    assert "no records" in result.output
    assert pq.read_schema(next((tmp_path / "r" / "samples").glob("*.parquet"))).equals(SAMPLES_SCHEMA)  # 0 rows


def test_streaming_reader_matches_json_load_across_chunk_boundaries(tmp_path, monkeypatch):
    import rglf.pipeline.ingest as ingest_module

    monkeypatch.setattr(ingest_module, "CHUNK_BYTES", 7)  # every record straddles several chunks
    records = [{"id": i, "conversations": conv("Q é ü?", "A" * (i % 13 + 1)), "x": 12345.678e3, "n": None}
               for i in range(40)] + [12345678, "text", [1, 2]]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    assert [r for _, r in ingest_module.read_records(path)] == records
    assert [w for w, _ in ingest_module.read_records(path)][:2] == [f"{path}[0]", f"{path}[1]"]


def test_duplicate_ids_found_in_bounded_memory(tmp_path, monkeypatch):
    from rglf.pipeline.ingest import SeenIds

    monkeypatch.setattr(SeenIds, "RECENT", 5)  # force many merges into the sorted arrays
    seen = SeenIds()
    firsts = {}
    for pos, sid in enumerate([f"id{i % 37}" for i in range(200)]):
        hit = seen.add(sid, 0, pos)
        if sid in firsts:
            assert hit == (0, firsts[sid])
        else:
            assert hit is None
            firsts[sid] = pos
    path = tmp_path / "dups.json"
    path.write_text(json.dumps(GOOD + [GOOD[1]]))
    _, _, errors = ingest(tmp_path, path)
    assert f"first seen at {path}[1]" in errors["duplicate_id"]["reason"]


def test_image_root_is_stored_absolute(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    path = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "image": "x.png", "conversations": conv("<image>\nQ?", "A")}])
    monkeypatch.chdir(tmp_path)
    run_ingest(IngestConfig(inputs=[path], image_root=Path("imgs"), out=tmp_path / "run"), log=lambda _: None)
    assert read(tmp_path / "run" / "samples")[0]["image_root"] == str(tmp_path / "imgs")


def test_interrupted_ingest_replaces_nothing(tmp_path, monkeypatch):
    import rglf.pipeline.ingest as ingest_module

    path = write_jsonl(tmp_path / "in.jsonl", GOOD)
    run = tmp_path / "run"
    run_ingest(IngestConfig(inputs=[path], image_root=tmp_path, out=run), log=lambda _: None)
    before = {p: p.read_bytes() for p in run.rglob("*.parquet")}
    calls = []
    real = ingest_module.parse_record

    def parse_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest_module, "parse_record", parse_then_ctrl_c)
    result = CliRunner().invoke(app, ["ingest", str(path), "--image-root", str(tmp_path), "--run", str(run), "--force"])
    assert result.exit_code == 130, result.output
    assert "rglf ingest: interrupted after 2 records; nothing was replaced" in result.output
    assert {p: p.read_bytes() for p in run.rglob("*.parquet")} == before
    assert not [p for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
