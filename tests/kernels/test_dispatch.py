"""`use_kernels` validation, the backend registry and fallback logging."""

from __future__ import annotations

import logging

import pytest
import torch

from ditq import kernels
from ditq.kernels import (
    current_preference,
    quant_linear,
    quant_linear_reference,
    register_backend,
    registered_backends,
    select_backend,
    unregister_backend,
    use_kernels,
)
from ditq.quant.qlinear import QuantLinear
from ditq.quant.spec import QuantSpec


@pytest.fixture
def registry():
    """Isolate the backend registry and the warn-once memory for one test."""
    saved = dict(kernels._BACKENDS)
    kernels._log_fallback_once.cache_clear()
    yield
    kernels._BACKENDS.clear()
    kernels._BACKENDS.update(saved)
    kernels._log_fallback_once.cache_clear()


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return QuantLinear.from_linear(torch.nn.Linear(64, 16), QuantSpec(w_bits=4, group_size=32))


def _never(reason):
    return lambda spec, x, module: reason


def _always(spec, x, module):
    return None


def test_default_preference_is_auto():
    assert current_preference() == "auto"


def test_use_kernels_nests_and_restores():
    with use_kernels("emulated"):
        assert current_preference() == "emulated"
        with use_kernels("triton"):
            assert current_preference() == "triton"
        assert current_preference() == "emulated"
    assert current_preference() == "auto"


def test_use_kernels_rejects_unknown_preference():
    with pytest.raises(ValueError, match=r"'cuda'.*\['auto', 'torch', 'emulated', 'triton'\]"):
        use_kernels("cuda")  # fails at the call, before any `with`
    with pytest.raises(ValueError, match="not one of"):
        with use_kernels("Triton"):
            pass
    assert current_preference() == "auto"


def test_requested_backend_missing_falls_back_and_logs_once(registry, layer, caplog):
    x = torch.randn(3, 64)
    with caplog.at_level(logging.WARNING, logger="ditq.kernels"), use_kernels("triton"):
        y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, quant_linear_reference(x, layer)) and torch.equal(y1, y2)
    records = [r for r in caplog.records if r.name == "ditq.kernels"]
    assert len(records) == 1 and "no Triton backend is registered" in records[0].getMessage()


def test_declining_backend_falls_back_and_logs_reason_once(registry, layer, caplog):
    register_backend("triton:test", _never("needs sm90"), lambda x, m: pytest.fail("must not run"))
    x = torch.randn(3, 64)
    with caplog.at_level(logging.WARNING, logger="ditq.kernels"), use_kernels("triton"):
        for _ in range(3):
            assert torch.equal(layer(x), quant_linear_reference(x, layer))
    messages = [r.getMessage() for r in caplog.records if r.name == "ditq.kernels"]
    assert len(messages) == 1 and "triton:test" in messages[0] and "needs sm90" in messages[0]


def test_auto_picks_first_supporting_backend(registry, layer):
    calls = []
    register_backend("triton:a", _never("not this shape"), lambda x, m: pytest.fail("declined"))
    register_backend("triton:b", _always, lambda x, m: calls.append("b") or quant_linear_reference(x, m))
    register_backend("torch:c", _always, lambda x, m: calls.append("c") or quant_linear_reference(x, m))
    assert registered_backends()[-3:] == ("triton:a", "triton:b", "torch:c")
    x = torch.randn(2, 64)
    layer(x)
    with use_kernels("torch"):
        layer(x)
    with use_kernels("triton"):
        assert select_backend(x, layer).name == "triton:b"
    assert calls == ["b", "c"]


def test_emulated_ignores_registered_backends(registry, layer):
    register_backend("triton", _always, lambda x, m: pytest.fail("emulated must use the reference"))
    x = torch.randn(2, 64)
    with use_kernels("emulated"):
        assert select_backend(x, layer) is None
        assert torch.equal(layer(x), quant_linear_reference(x, layer))


def test_torch_preference_without_backends_uses_reference_silently(registry, layer, caplog):
    with caplog.at_level(logging.WARNING, logger="ditq.kernels"), use_kernels("torch"):
        layer(torch.randn(2, 64))
    assert not [r for r in caplog.records if r.name == "ditq.kernels"]


def test_register_backend_validation(registry):
    with pytest.raises(ValueError, match="must be one of"):
        register_backend("cuda", _always, quant_linear_reference)
    with pytest.raises(ValueError, match="must be one of"):
        register_backend("triton:", _always, quant_linear_reference)
    register_backend("triton:x", _always, quant_linear_reference)
    with pytest.raises(ValueError, match="already registered"):
        register_backend("triton:x", _always, quant_linear_reference)
    register_backend("triton:x", _always, quant_linear_reference, replace=True)
    unregister_backend("triton:x")
    assert "triton:x" not in registered_backends()


def test_backend_receives_spec_input_and_module(registry, layer):
    seen = {}

    def supports(spec, x, module):
        seen.update(spec=spec, shape=tuple(x.shape), module=module)
        return None

    register_backend("triton:spy", supports, quant_linear_reference)
    with use_kernels("triton"):
        layer(torch.randn(5, 64))
    assert seen == {"spec": layer.spec, "shape": (5, 64), "module": layer}


def test_input_validation_happens_before_dispatch(layer):
    with pytest.raises(ValueError, match="last dim 32 but the QuantLinear expects in_features=64"):
        quant_linear(torch.randn(2, 32), layer)
    with pytest.raises(TypeError, match="floating-point"):
        quant_linear(torch.ones(2, 64, dtype=torch.int64), layer)
