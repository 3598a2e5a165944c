"""The model-family registry: a family module of medlvr/models is found by its MODEL_TYPES and
PROCESSORS, and a model or processor of no family is refused by name."""
from types import SimpleNamespace

import pytest

from medlvr.models import build_default, qwen_vl
from medlvr.policy import families


def test_qwen_vl_serves_its_model_types_and_processors():
    model, processor = build_default(seed=0)
    assert families.of_model(model) is qwen_vl
    assert families.of_model(model.config) is qwen_vl
    assert families.of_processor(processor) is qwen_vl
    assert {"qwen2_5_vl", "qwen2_vl"} <= set(families.families())


def test_an_unknown_family_is_named():
    with pytest.raises(ValueError, match="model_type 'llava'.*supported"):
        families.of_model_type("llava")
    with pytest.raises(ValueError, match="processor: no medlvr model family for a SimpleNamespace"):
        families.of_processor(SimpleNamespace())
