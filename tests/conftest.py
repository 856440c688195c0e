import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses: tiny models, no thread fights


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread, and two test processes never fight for cores.
    Tests on the real model raise it themselves."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from governance.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    from governance.models.tiny import tiny_tokenizer

    return tiny_tokenizer(chat_template=False)


@pytest.fixture(scope="session")
def aligned(tokenizer):
    """Two aligned persona pairs on two questions; the first pair differs in token length
    (exercises padding). Shared by the engine tests."""
    from governance.inputs.personas import load_catalogue
    from governance.inputs.prompts import PromptBuilder, PromptFormat
    from governance.inputs.questions import Question

    questions = [
        Question("q1", "math", "Which number is prime?", ("4", "6", "7", "9"), "C"),
        Question("q2", "geo", "What is the capital of France?",
                 ("Paris", "London", "Berlin", "Rome"), "A"),
    ]
    builder = PromptBuilder(tokenizer, PromptFormat(load_catalogue().instruction()))
    pairs = [builder.pair("a physically-disabled person", "a human", q) for q in questions]
    assert pairs[0].padded == "corrupt"
    return pairs


@pytest.fixture(scope="session")
def _tiny_audit_once(tokenizer):
    from support.audits import TINY_SOURCE, TINY_SPEC, run_tiny_audit

    return run_tiny_audit(tokenizer, TINY_SPEC, TINY_SOURCE)


@pytest.fixture(scope="module")
def tiny_audit(_tiny_audit_once):
    """The shared tiny audit (support.audits.TINY_SPEC on a tiny random llama), run once per
    session; each test module gets its own deep copy, so an edit in one module cannot reach
    another. Tests that edit it take `support.audits.copy_audit(tiny_audit)` first."""
    import copy

    return copy.deepcopy(_tiny_audit_once)


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database (dropped afterwards); skipped when the server is
    unreachable, except under CI=true."""
    import uuid

    import sqlalchemy

    admin = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
    try:
        engine = sqlalchemy.create_engine(admin, connect_args={"connect_timeout": 3},
                                          isolation_level="AUTOCOMMIT",
                                          pool_pre_ping=True)  # a test may restart the server
        engine.connect().close()
    except sqlalchemy.exc.OperationalError as exc:
        if os.environ.get("CI", "").lower() == "true":
            raise RuntimeError(f"CI=true but PostgreSQL is unreachable: {exc}") from exc
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 unreachable: {exc}")
    name = f"pgov_test_{uuid.uuid4().hex[:8]}"
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"  # bare URL: the store picks psycopg2
    finally:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()
