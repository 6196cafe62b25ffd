import os

import pytest

# Keep the dequantized-model cache out of the user's home during tests only if asked; by default share it,
# so the real-model tests pay the ~20 s GGUF dequantization once per machine.
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def tiny_llama():
    from sparsen import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2():
    from sparsen import load_model

    return load_model("tiny-qwen2")


@pytest.fixture(scope="session")
def smollm2():
    from sparsen import load_model

    return load_model("smollm2")
