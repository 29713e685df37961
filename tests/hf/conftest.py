import pytest


@pytest.fixture(autouse=True)
def _references_for_whole_models(monkeypatch):
    # Whole-model tests check the integration; the kernels themselves are tested under the interpreter in
    # tests/kernels (and inside a compiled model in tests/backend). Running every op of a model through the
    # interpreter would only make these slow.
    monkeypatch.setenv("KERNOPT_CPU", "reference")
