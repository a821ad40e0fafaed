"""The CLI: bad overrides exit 2 before Ray starts; list and report print what they should."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from pipelines import cli
from pipelines.config import ConfigError, apply_overrides, parse_set_args, valid_keys
from pipelines.rcnn.config import RCNNConfig


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["proposals.sigmaa=0.8"], "unknown key 'proposals.sigmaa' (did you mean proposals.sigma"),
        (["svm.c=0.01"], "unknown key 'svm.c' (did you mean svm.C?); keys of svm: layer, neg_iou"),
        (["nope=1"], "unknown key 'nope'"),
        (["proposals.base_k=fifty"], "proposals.base_k: expected an integer, got 'fifty'"),
        (["proposals.sigma=abc"], "proposals.sigma: expected a number"),
        (["proposals.mode=slow"], "'slow' is not one of rcnn, fast, quality, single"),
        (["data.download=maybe"], "expected a boolean"),
        (["proposals.sigma=-1"], "proposals.sigma must be > 0"),
        (["data.max_images=-3"], "data.max_images must be >= 0"),
        (["proposals"], "--set expects KEY=VALUE"),
        (["proposals=1"], "'proposals' is a section"),
    ],
)
def test_bad_set_exits_2_before_ray(capsys, tmp_path, monkeypatch, sets, message):
    from cluster import runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a bad configuration")

    monkeypatch.setattr(runtime, "connect", no_ray)
    argv = ["run", "rcnn", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r")]
    for s in sets:
        argv += ["--set", s]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert message in err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_a_store_uri_pyarrow_cannot_open_exits_2_naming_it(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "rcnn", "--store", "foo://x", "--out", str(tmp_path))
    assert code == 2
    assert "foo://x: not a usable artifact store URI" in err and "Traceback" not in err


def test_jobs_errors_exit_2_naming_the_job_and_address(capsys, monkeypatch):
    from cluster import jobs

    def unknown(address, job_id):
        raise RuntimeError(f"Request failed with status code 404: Job {job_id} does not exist.")

    monkeypatch.setattr(jobs, "status", unknown)
    code, _, err = run_cli(capsys, "jobs", "status", "raysubmit_x", "--address", "http://h:8265")
    assert code == 2
    assert "jobs status raysubmit_x at http://h:8265: Request failed" in err


def test_unknown_preset_pipeline_and_force_step(capsys, tmp_path):
    assert run_cli(capsys, "run", "rcnn", "--preset", "huge")[2].count("presets: tiny, ci") == 1
    code, _, err = run_cli(capsys, "run", "yolo")
    assert code == 2 and "pipelines: rcnn" in err
    code, _, err = run_cli(capsys, "run", "rcnn", "--force", "svmm", "--store", str(tmp_path))
    assert code == 2 and "steps: dataset, proposals, proposal_report" in err


def test_overrides_are_typed():
    cfg = apply_overrides(
        RCNNConfig(),
        parse_set_args(
            [
                "proposals.sigma=0.5",
                "proposals.base_k=100",
                "data.download=true",
                "report.recall_top_ns=1,5",
                "proposals.mode=quality",
            ]
        ),
    )
    assert cfg.proposals.sigma == 0.5 and isinstance(cfg.proposals.sigma, float)
    assert cfg.proposals.base_k == 100 and cfg.data.download is True
    assert cfg.report.recall_top_ns == (1, 5) and cfg.proposals.mode == "quality"
    assert RCNNConfig().proposals.sigma == 0.8  # the default object is untouched
    with pytest.raises(ConfigError):
        apply_overrides(RCNNConfig(), {"report.recall_top_ns": "1,x"})
    assert "proposals.min_width_px" in valid_keys(RCNNConfig())


def test_list_names_presets_steps_and_keys(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    assert "rcnn:" in out and "presets: tiny (default), ci, table2, voc2007" in out
    assert "ssl:" in out and "steps" not in out.split("`paperline list PIPELINE`")[0]
    code, out, _ = run_cli(capsys, "list", "rcnn")
    assert code == 0 and "preset voc2007: data.source=voc" in out
    assert "dataset[task] -> proposals[map] -> proposal_report[task]" in out
    assert "keys (values of preset tiny; --set KEY=VALUE):" in out
    lines = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("    svm.")}
    assert lines["svm.C"] == ["float", "0.001"] and lines["svm.mode"][-1] == "'hnm'"
    code, out, _ = run_cli(capsys, "list", "rcnn", "--preset", "ci")
    keys = out.split("keys (values of preset ci")[1]
    assert keys.split("data.num_train")[1].split()[1] == "16"


def test_list_without_a_pipeline_loads_no_torch():
    """`paperline list` took 6.3 s (issue 22): building configs imported torch."""
    code = (
        "import sys; from pipelines import cli; cli.main(['list']); print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "False"


def test_help_has_no_rst_markup_and_every_option_has_help(capsys):
    parser = cli.build_parser()
    assert "``" not in parser.format_help()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            assert action.help, f"paperline {name} {action.option_strings or action.dest}"


def test_report_of_a_run_dir(capsys, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(
        json.dumps(
            [
                {"step": "dataset", "kind": "task", "status": "cached", "wall_s": 0.0, "key": "k1"},
                {
                    "step": "proposals",
                    "kind": "map",
                    "status": "computed",
                    "wall_s": 3.25,
                    "key": "k2",
                },
            ]
        )
    )
    (run_dir / "metrics.json").write_text(json.dumps({"proposal_recall_iou0.5": 0.875}))
    (run_dir / "report.md").write_text("# r\n")
    code, out, _ = run_cli(capsys, "report", str(run_dir))
    assert code == 0
    assert "proposals            map    computed       3.2  k2" in out
    assert "proposal_recall_iou0.5: 0.875" in out
    code, _, err = run_cli(capsys, "report", str(tmp_path / "missing"))
    assert code == 2 and "not a run directory" in err


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", "run", "rcnn", "--set", "x.y=1"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "unknown key 'x.y'" in proc.stderr


def test_optional_knobs_enter_keys_only_when_set():
    """cnn.warp (App. A) and features.amp change keys only when not the default (stores made
    before the options existed stay valid)."""
    from pipelines import registry
    from pipelines.engine import step_key

    spec = registry.get("rcnn")

    def keys(overrides):
        steps = spec.steps(spec.build_config("tiny", overrides))
        out = {}
        for s in steps:  # topological order already
            out[s.name] = step_key(s, {a: out[i] for a, i in s.input_pairs()})
        return out

    plain, square = keys({}), keys({"cnn.warp": "square_mean"})
    changed = {k for k in plain if plain[k] != square[k]}
    assert {"dataset", "proposals", "proposal_report"}.isdisjoint(changed)
    assert {"pretrain", "finetune", "features", "svm", "detect"} <= changed
    default_params = {s.name: s.params for s in spec.steps(spec.build_config("tiny"))}
    assert all("warp" not in p and "amp" not in p for p in default_params.values())
    # features.amp: the features step and what reads it, not the CNN's training
    bf16 = keys({"features.amp": "bf16"})
    changed = {k for k in plain if plain[k] != bf16[k]}
    assert {"dataset", "proposals", "pretrain", "finetune"}.isdisjoint(changed)
    assert {"features", "svm", "detect", "evaluate"} <= changed


def test_submit_passes_store_and_out_as_given(tmp_path, monkeypatch, capsys):
    """Issue 18: the job gets the cluster-side --store/--out exactly as typed, from any working
    directory of the client; a relative local store is refused (it would name a client path)."""
    from cluster import jobs

    seen = {}
    monkeypatch.setattr(
        jobs, "submit", lambda address, entrypoint, *a, **k: seen.setdefault("cmd", entrypoint)
    )
    monkeypatch.chdir(tmp_path)  # not the repository
    argv = ["submit", "rcnn", "--preset", "ci", "--address", "http://head:8265"]
    assert cli.main([*argv, "--store", "s3://bucket/paperline", "--out", "/shared/runs"]) == 0
    words = shlex.split(seen["cmd"])
    assert words[words.index("--store") + 1] == "s3://bucket/paperline"
    assert words[words.index("--out") + 1] == "/shared/runs"
    assert cli.main([*argv, "--store", "store"]) == 2
    assert "--store 'store' is relative" in capsys.readouterr().err
