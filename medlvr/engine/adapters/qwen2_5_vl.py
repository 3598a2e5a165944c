"""Qwen2.5-VL adapter: the reference model. Same decoder layout and mRoPE as Qwen2-VL
(the vision tower's window attention does not concern the engine)."""
from __future__ import annotations

from medlvr.engine.adapters.base import register
from medlvr.engine.adapters.qwen2_vl import QwenVLAdapter


@register
class Qwen2_5_VLAdapter(QwenVLAdapter):
    model_types = ("qwen2_5_vl",)
