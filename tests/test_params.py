"""params.yaml: one schema (src/vital/params.py), checked before a stage's heavy imports, one line per problem."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import typer.testing
import yaml

from vital import cli
from vital.params import ParamsError, check

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "params.yaml").read_text()


def with_value(tmp_path, section, key, value, text=TEXT) -> Path:
    """params.yaml with one value changed the way `dvc exp run -S section.key=value` changes it."""
    data = yaml.safe_load(text)
    if value is KeyError:
        del data[section][key]
    else:
        data[section][key] = value
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_the_repositorys_params_yaml_passes():
    assert set(check(ROOT / "params.yaml")) == {"corpus", "dedup", "decontaminate", "llm", "annotation_pool",
                                                "engine", "generate", "rate", "merge_preferences", "train_selector", "filter",
                                                "tune", "evaluate"}


# every bad value the issue tried, and the words it now stops with
@pytest.mark.parametrize("section, key, value, words", [
    ("filter", "ratio", -1, "filter.ratio is -1; allowed: a number > 0 and <= 1"),
    ("filter", "ratio", 2, "filter.ratio is 2; allowed: a number > 0 and <= 1"),
    ("filter", "ratio", "abc", "filter.ratio is 'abc'; allowed: a number > 0 and <= 1"),
    ("filter", "ratio", 0, "filter.ratio is 0; allowed: a number > 0 and <= 1"),
    ("filter", "top_k", -3, "filter.top_k is -3; allowed: an integer >= 0"),
    ("corpus", "shard_mb", 0, "corpus.shard_mb is 0; allowed: a number > 0"),
    ("generate", "concurrency", "abc", "generate.concurrency is 'abc'; allowed: an integer >= 1"),
    ("annotation_pool", "clusters", 0, "annotation_pool.clusters is 0; allowed: an integer >= 1"),
    ("annotation_pool", "per_cluster", 0, "annotation_pool.per_cluster is 0; allowed: an integer >= 1"),
    ("merge_preferences", "clinician_weight", -5, "merge_preferences.clinician_weight is -5; allowed: a number >= 0"),
    ("generate", "backend", "openia", "generate.backend is 'openia'; allowed: one of offline, openai, transformers"),
    ("filter", "balance_domains", 1, "filter.balance_domains is 1; allowed: true or false"),
    ("tune", "target_modules", [], "tune.target_modules is []; allowed: a list of text not empty"),
    ("llm", "prices", {"gpt-4o": [2.5]}, "llm.prices.gpt-4o is [2.5]; allowed: [input, output]: two numbers >= 0 "
                                         "(USD per million tokens)"),
    ("tune", "lr", KeyError, "tune.lr is missing: copy it from the repository's params.yaml"),
    ("filter", "ratoi", 0.5, "filter.ratoi: unknown key; allowed: ratio, top_k, balance_domains, shard_mb"),
    ("merge_preferences", "clinician_holdout", 0.2, "merge_preferences.clinician_holdout is gone: splits are by "
                                                    "figure now"),
    ("merge_preferences", "model_test", 0.95, "merge_preferences: model_validation + model_test is 1.05; allowed: "
                                              "less than 1"),
    ("train_selector", "backbone", "biomedclip", "train_selector: backbone_model is null; allowed with backbone "
                                                 "biomedclip"),
    ("generate", "api_key", "sk-secret", "generate.api_key looks like a credential"),
    ("dedup", "phash_distance", 40, "dedup.phash_distance is 40; allowed: an integer >= 0 and <= 32"),
    ("decontaminate", "text_cosine", 1.5, "decontaminate.text_cosine is 1.5; allowed: a number > 0 and <= 1"),
    ("decontaminate", "eval_sets", ["/data/slake"], "decontaminate.eval_sets.0 is '/data/slake'; allowed: a folder name inside eval_root"),
    ("evaluate", "eval_sets", [{"name": "rad", "format": "huggingface", "path": "/data/vqa-rad"}],
     "evaluate.eval_sets: eval set 'rad': path /data/vqa-rad is outside eval_root (examples), so DVC would not rerun"),
    ("evaluate", "eval_sets", [{"name": "rad", "format": "huggingface"}],
     "evaluate.eval_sets: eval set 'rad' (format huggingface) has no path; allowed: a path inside eval_root (examples)"),
    ("evaluate", "eval_sets", [{"name": "s", "format": "sample"}, {"name": "s", "format": "vital", "path": "examples/eval"}],
     "evaluate.eval_sets: eval set name 's' is used twice"),
    ("evaluate", "eval_sets", [{"name": "rad", "format": "vqa"}], "evaluate.eval_sets.0.format is 'vqa'; allowed: one of sample, huggingface, slake, llava_med, vital"),
    ("evaluate", "eval_sets", [], "evaluate.eval_sets is []"),
])
def test_a_bad_value_is_one_line_naming_file_line_key_value_and_what_is_allowed(tmp_path, section, key, value, words):
    path = with_value(tmp_path, section, key, value)
    with pytest.raises(ParamsError) as e:
        check(path)
    line, = str(e.value).splitlines()  # one problem, one line
    assert line.startswith(f"{path}:") and words in line
    number = int(line.split(":")[1])  # the line of the key (of its section when the key is missing)
    shown = path.read_text().splitlines()[number - 1].strip()
    assert shown.startswith(f"{section}:" if value is KeyError or "+" in words or "backbone_model" in words
                            else f"{key}:")
    assert "sk-secret" not in line  # a credential's value is never echoed


def test_every_problem_is_listed_and_broken_yaml_names_its_line(tmp_path):
    path = with_value(tmp_path, "filter", "ratio", 2)
    path.write_text(path.read_text().replace("top_k: 0", "top_k: -1"))
    assert [x.split(": ", 1)[1] for x in str(pytest.raises(ParamsError, check, path).value).splitlines()] == [
        "filter.ratio is 2; allowed: a number > 0 and <= 1", "filter.top_k is -1; allowed: an integer >= 0"]
    path.write_text("corpus:\n  source: sample\n  path: [unclosed\n")
    assert str(pytest.raises(ParamsError, check, path).value).startswith(f"{path}:4: not valid YAML")


def copy_stages(tmp_path) -> Path:
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    return tmp_path


def test_a_stage_stops_on_a_bad_value_before_its_heavy_imports(tmp_path):
    work = copy_stages(tmp_path)
    (work / "params.yaml").write_text(TEXT.replace("\n  ratio: 0.8 ", "\n  ratio: abc "))
    line = TEXT[:TEXT.index("\n  ratio: 0.8 ")].count("\n") + 2
    p = subprocess.run([sys.executable, "-X", "importtime", "stages/filter.py"], cwd=work, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2
    problems = [x for x in p.stderr.splitlines() if not x.startswith("import time:")]
    assert problems == [f"params.yaml:{line}: filter.ratio is 'abc'; allowed: a number > 0 and <= 1"]
    imported = {x.split("|")[-1].strip() for x in p.stderr.splitlines() if x.startswith("import time:")}
    assert "vital.params" in imported and not {"torch", "pandas", "transformers", "vital.selector"} & imported


def test_vital_validate_params(tmp_path):
    runner = typer.testing.CliRunner()
    ok = runner.invoke(cli.app, ["validate", "params", str(ROOT / "params.yaml")])
    assert ok.exit_code == 0 and "ok (13 sections" in ok.output
    bad = runner.invoke(cli.app, ["validate", "params", str(with_value(tmp_path, "annotation_pool", "per_cluster", 0))])
    assert bad.exit_code == 2 and "annotation_pool.per_cluster is 0; allowed: an integer >= 1" in bad.output


def test_any_vital_error_is_one_line_and_exit_2_with_the_traceback_under_debug(monkeypatch, capsys):
    broken = typer.Typer()

    @broken.command()
    def boom():
        raise RuntimeError("the disk is full\nsecond line")

    @broken.command()
    def other():
        pass

    monkeypatch.setattr(cli, "app", broken)
    for argv, code, words in [(["boom"], 2, "error: RuntimeError: the disk is full; second line (rerun with --debug"),
                              (["bogus"], 2, "error: No such command 'bogus'.")]:
        monkeypatch.setattr(sys, "argv", ["vital", *argv])
        with pytest.raises(SystemExit) as e:
            cli.main()
        err = capsys.readouterr().err
        assert e.value.code == code and err.count("\n") == 1 and words in err and "Traceback" not in err
    monkeypatch.setattr(sys, "argv", ["vital", "boom", "--debug"])
    with pytest.raises(RuntimeError, match="the disk is full"):
        cli.main()


def test_stage_commands_find_the_projects_python_without_activation(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no venv on PATH, none activated
    work = copy_stages(tmp_path)
    os.symlink(Path(sys.executable).parents[1], work / ".venv")
    p = subprocess.run(["stages/python", "-c", "import sys, vital; print(sys.prefix)"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and Path(p.stdout.strip()).resolve() == Path(sys.prefix).resolve()
    (work / ".venv").unlink()
    p = subprocess.run(["stages/python", "-c", "pass"], cwd=work, env={**env, "PATH": str(tmp_path / "none")},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 127 and p.stderr == ("stages/python: no Python environment for this project; run "
                                                "'make install', then '. .venv/bin/activate'\n")
