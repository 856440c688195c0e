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
    from governance.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    from governance.tiny import tiny_tokenizer

    return tiny_tokenizer(chat_template=False)
