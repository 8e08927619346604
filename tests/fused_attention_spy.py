"""A spy counting the calls `KDeepseekV2Attention` ran as the fused engine step (shared by tests)."""

from __future__ import annotations

from kt_models_deepseek.mla_attention import KDeepseekV2Attention


def count_fused_steps(monkeypatch) -> dict[str, int]:
    """Patch `_fused_attend` to count the calls it computed (not the ones it handed back as None)."""
    calls = {"fused": 0}
    real = KDeepseekV2Attention._fused_attend

    def spy(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls["fused"] += out is not None
        return out

    monkeypatch.setattr(KDeepseekV2Attention, "_fused_attend", spy)
    return calls
