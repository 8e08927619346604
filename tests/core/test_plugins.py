"""Plugin discovery from entry points, with fake distributions instead of real installs."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import dataclass

from pydantic import BaseModel

from kt_core import OperatorKind, hookimpl
from kt_core.plugins import allowed_plugins, load_plugins
from kt_core.registry import UnknownNameError


@dataclass
class FakeDist:
    name: str
    version: str = "1.0"


@dataclass
class FakeEntryPoint:
    """Quacks like importlib_metadata.EntryPoint for load_plugins."""

    name: str
    value: str
    module: types.ModuleType | None = None
    error: Exception | None = None

    @property
    def dist(self) -> FakeDist:
        return FakeDist(self.name)

    def load(self) -> types.ModuleType:
        if self.error is not None:
            raise self.error
        assert self.module is not None
        return self.module


class NoKwargs(BaseModel):
    model_config = {"extra": "forbid"}


def plugin_module(name: str, op_names: list[str], *, fail: bool = False) -> types.ModuleType:
    module = types.ModuleType(name)

    @hookimpl
    def register_operators(register):
        for op in op_names:
            register(name=op, target=f"{name}:{op}", kind=OperatorKind.MODULE, summary="test", kwargs_model=NoKwargs)
        if fail:
            raise RuntimeError("boom")

    module.register_operators = register_operators
    return module


def test_plugins_register_with_their_distribution():
    loaded = load_plugins([FakeEntryPoint("kt-alpha", "alpha", plugin_module("alpha", ["AlphaOp"]))])
    spec = loaded.registry.resolve_operator("AlphaOp")
    assert spec.distribution == "kt-alpha"
    assert [p.distribution for p in loaded.plugins] == ["kt-core", "kt-alpha"]
    assert "KTransformersLinear" in loaded.registry.operators  # kt-core's own always load


def test_plugin_that_fails_to_import_is_reported_and_others_work():
    loaded = load_plugins([
        FakeEntryPoint("kt-broken", "broken", error=ImportError("no module named 'nonexistent_dep'")),
        FakeEntryPoint("kt-good", "good", plugin_module("good", ["GoodOp"])),
    ])
    assert loaded.registry.resolve_operator("GoodOp")
    (failure,) = loaded.registry.failures
    assert failure.plugin == "kt-broken"
    assert "nonexistent_dep" in failure.error


def test_plugin_whose_registration_raises_leaves_nothing_behind():
    loaded = load_plugins([FakeEntryPoint("kt-half", "half", plugin_module("half", ["HalfOp"], fail=True))])
    assert "HalfOp" not in loaded.registry.operators
    assert "register_operators raised RuntimeError: boom" in loaded.registry.failures[0].error


def test_duplicate_name_rejects_the_second_plugin():
    loaded = load_plugins([
        FakeEntryPoint("kt-a", "a", plugin_module("a", ["SameOp"])),
        FakeEntryPoint("kt-b", "b", plugin_module("b", ["SameOp", "OtherOp"])),
    ])
    assert loaded.registry.operators["SameOp"].distribution == "kt-a"
    assert "OtherOp" not in loaded.registry.operators
    assert "already registered by kt-a" in loaded.registry.failures[0].error


def test_allow_list_limits_plugins():
    eps = [FakeEntryPoint("kt-a", "a", plugin_module("a", ["AOp"])), FakeEntryPoint("kt-b", "b", plugin_module("b", ["BOp"]))]
    loaded = load_plugins(eps, allow=allowed_plugins({"KT_PLUGINS": "kt_b"}))
    assert "BOp" in loaded.registry.operators and "AOp" not in loaded.registry.operators
    assert allowed_plugins({}) is None


def test_missing_known_plugin_says_what_to_install():
    loaded = load_plugins([])
    try:
        loaded.registry.resolve_operator("KExpertsTorch")
    except UnknownNameError as exc:
        assert "provided by kt-ops-torch, which is not installed" in str(exc)
        assert "pip install kt-ops-torch" in str(exc)
    else:
        raise AssertionError("expected UnknownNameError")


def test_failed_known_plugin_reports_its_error():
    loaded = load_plugins([FakeEntryPoint("kt-ops-torch", "x", error=ImportError("broken build"))])
    try:
        loaded.registry.resolve_operator("KLinearTorch")
    except UnknownNameError as exc:
        assert "provided by kt-ops-torch, which failed to load" in str(exc) and "broken build" in str(exc)


def test_installed_entry_points_are_discovered(registry):
    assert {"kt-ops-torch", "kt-models-deepseek", "kt-models-qwen", "kt-dummy-plugin"} <= set(registry.distributions)
    assert registry.resolve_operator("KExpertsTorch").distribution == "kt-ops-torch"
    assert registry.resolve_operator("ktransformers.operators.linear.KLinearTorch").name == "KLinearTorch"


def _run(code: str, env_extra: dict[str, str] | None = None) -> str:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout


def test_operator_implementations_are_imported_lazily():
    """Discovering plugins and validating rules must not import operator modules."""
    out = _run(
        "import sys\n"
        "from kt_core.plugins import get_registry\n"
        "from kt_core.rules import parse_rules\n"
        "r = get_registry()\n"
        "parse_rules('- match: {name: lm_head}\\n  replace: {class: DummyScaledModule, kwargs: {factor: 2}}\\n', r)\n"
        "print('kt_dummy_plugin.ops' in sys.modules, 'kt_ops_torch.experts' in sys.modules)\n"
        "r.resolve_operator('DummyScaledModule').load_class()\n"
        "print('kt_dummy_plugin.ops' in sys.modules)\n"
    )
    assert out.split() == ["False", "False", "True"]


def test_env_variable_limits_installed_plugins():
    out = _run(
        "from kt_core.plugins import get_registry\n"
        "print(sorted(get_registry().distributions))\n",
        {"KT_PLUGINS": "kt-ops-torch"},
    )
    assert out.strip() == "['kt-core', 'kt-ops-torch']"
