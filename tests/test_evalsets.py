"""The benchmark files users have, read as `evaluate` answers them: counts, closed/open rule, one-line errors."""
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import bench_jpeg as _jpeg

from vital.evalsets import EvalSetError, load


def test_each_benchmark_layout_is_read_with_its_closed_rule_and_counts(bench):
    rad = load("vqa_rad", "huggingface", bench / "vqa-rad", domain="chest_xray")
    assert [(v["question_id"], v["answer_type"]) for v in rad.vqa] == [
        ("0", "CLOSED"), ("1", "CLOSED"), ("2", "OPEN"), ("3", "OPEN")]  # the train shard is not read
    assert rad.closed_rule.startswith("closed = the answer is yes or no") and rad.vqa[0]["domain"] == "chest_xray"
    assert rad.read(rad.vqa[3]["image"]) == _jpeg(10)

    slake = load("slake", "slake", bench / "slake")
    assert [(v["question_id"], v["answer_type"], v["domain"]) for v in slake.vqa] == [
        ("1", "OPEN", "ct_scan"), ("2", "CLOSED", "ct_scan")]
    assert slake.left_out == [{"id": "slake/3", "reason": "q_lang zh (evaluate.languages: en)"}]
    assert len(load("slake", "slake", bench / "slake", languages=None).vqa) == 3
    assert slake.read("imgs/xmlab1/source.jpg") == _jpeg(5)

    med = load("qa50", "llava_med", bench / "llava-med/llava_med_eval_qa50_qa.jsonl")
    assert (med.vqa, len(med.chat), med.chat[0]["domain"], med.chat[0]["dataset"]) == ([], 1, "ct_scan", "qa50")
    assert med.read("x.jpg") == _jpeg(7)

    ours = load("eval", "vital", Path(__file__).parents[1] / "examples/eval")
    assert {v["dataset"] for v in ours.vqa} == {"vqa_rad", "slake", "pathvqa"} and len(ours.chat) == 3


def test_a_wrong_path_or_layout_is_one_line_naming_what_is_missing(bench):
    with pytest.raises(EvalSetError, match=r"nowhere: no such file or folder \(eval set 'x', format slake: a folder "
                                           r"with test.json and imgs/\)"):
        load("x", "slake", bench / "nowhere")
    with pytest.raises(EvalSetError, match=r"vqa-rad: not in the slake format .*; it looks like huggingface\)"):
        load("x", "slake", bench / "vqa-rad")
    rows = json.loads((bench / "slake/test.json").read_text())
    (bench / "slake/test.json").write_text(json.dumps(rows + [{**rows[0], "img_name": "xmlab9/source.jpg"}]))
    with pytest.raises(EvalSetError, match=r"test.json: item 4: image .*xmlab9/source.jpg is missing"):
        load("slake", "slake", bench / "slake")
    (bench / "slake/test.json").write_text(json.dumps([{**rows[0], "answer_type": "MAYBE"}]))
    with pytest.raises(EvalSetError, match=r"test.json: item 1: answer_type 'MAYBE'"):
        load("slake", "slake", bench / "slake")
    pq.write_table(pa.table({"img": [b"x"], "question": ["q"]}), bench / "vqa-rad/data/test-00000-of-00002.parquet")
    with pytest.raises(EvalSetError, match=r"test-00000-of-00002.parquet: no column answer, image; the Hugging Face"):
        load("vqa_rad", "huggingface", bench / "vqa-rad")
    with pytest.raises(OSError, match="image 'gone.jpg' is not in .*llava-med/images"):  # evaluate skips it, by id
        load("qa50", "llava_med", bench / "llava-med/llava_med_eval_qa50_qa.jsonl").read("gone.jpg")


def _lmms_eval_slake():
    """lmms-eval's own SLAKE scoring module (lmms_eval/tasks/slake/utils.py), loaded by path: importing the
    lmms_eval package needs its whole model stack."""
    import importlib.util

    spec = importlib.util.find_spec("lmms_eval")
    if spec is None:
        pytest.fail("lmms-eval is not installed: `make install` puts lmms-eval==0.7.3 in .venv (--no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "tasks/slake/utils.py"
    module_spec = importlib.util.spec_from_file_location("lmms_eval_slake_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_the_lmms_eval_export_is_scored_by_lmms_evals_own_slake_code(bench, tmp_path):
    from typer.testing import CliRunner

    from vital.cli import app
    from vital.evaluate import export, vqa_scores, vqa_tables
    from vital.schema import write_jsonl

    slake = load("slake", "slake", bench / "slake")
    rows = json.loads((bench / "slake/test.json").read_text())
    more = [{**rows[1], "qid": 10 + k, "question": f"Is there a lesion in slice {k}?", "answer": ["Yes", "No"][k % 2],
             "content_type": "Abnormality"} for k in range(6)]
    (bench / "slake/test.json").write_text(json.dumps(rows + more, ensure_ascii=False))
    slake = load("slake", "slake", bench / "slake")
    answers = {"slake/1": "Left lung.", "slake/2": "yes", **{f"slake/{10 + k}": "Yes." for k in range(6)}}
    ours = vqa_tables(vqa_scores(slake.vqa, answers)[0])["slake"]

    files = export(slake.vqa, answers, "lmms-eval")
    assert list(files) == ["slake_samples_slake_en.jsonl"]
    lmms = _lmms_eval_slake()
    scored = [lmms.slake_process_results(s["doc"], s["filtered_resps"])["slake_accuracy"] for s in
              files["slake_samples_slake_en.jsonl"]]
    assert len(scored) == 8 and {r["language"] for r in scored} == {"en"}
    closed = lmms.slake_aggregate_closed_accuracy(scored)
    assert closed * (100 if closed <= 1 else 1) == pytest.approx(100 * ours["closed_accuracy"]["rate"], abs=0.01)
    assert ours["closed_accuracy"]["n"] == 7 and ours["closed_accuracy"]["k"] == 4  # Is this a CT + 3 of 6
    open_ = lmms.slake_aggregate_open_accuracy(scored)  # exact match after its normalisation: our open exact match
    assert open_ * (100 if open_ <= 1 else 1) == pytest.approx(100 * ours["open_exact_match"]["rate"]) == 100
    assert lmms.slake_aggregate_ct_accuracy(scored) is not None

    # the CLI writes the same from the evaluate stage's files
    eval_dir = tmp_path / "eval"
    write_jsonl(eval_dir / "vqa.jsonl", slake.vqa)
    write_jsonl(eval_dir / "answers.jsonl", [{"id": k, "model": "tuned", "answer": v} for k, v in answers.items()])
    result = CliRunner().invoke(app, ["eval", "export", "--format", "lmms-eval", "--eval-dir", str(eval_dir),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = [json.loads(x) for x in (tmp_path / "out/slake_samples_slake_en.jsonl").read_text().splitlines()]
    assert written == files["slake_samples_slake_en.jsonl"]

    rad = load("vqa_rad", "huggingface", bench / "vqa-rad")
    med = export(rad.vqa, {f"vqa_rad/{k}": "yes" for k in range(4)}, "medevalkit")["vqa_rad_results.json"]
    assert [set(r) for r in med] == [{"id", "question", "answer", "response", "answer_type"}] * 4  # cal_metrics' fields
    assert export(rad.vqa, {}, "lmms-eval") == {}  # lmms-eval has a SLAKE task only
    result = CliRunner().invoke(app, ["eval", "export", "--format", "vlmevalkit", "--eval-dir", str(eval_dir)])
    assert result.exit_code == 2 and "export format 'vlmevalkit'" in result.output
