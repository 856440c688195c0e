import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def tokenizer():
    from governance.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    from governance.tiny import tiny_tokenizer

    return tiny_tokenizer(chat_template=False)
