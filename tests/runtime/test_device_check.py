"""A plan that needs CUDA devices the machine lacks is a user error, found before weights are read."""

from __future__ import annotations

import pytest
import torch
from tiny_models import deepseek_v2_config, meta_model

from kt_core.cli.main import main
from kt_core.devices import DeviceMap
from kt_core.errors import KtUserError
from kt_core.planner import plan
from kt_core.rules import load_rules
from kt_core.rules.shipped import find_rule_file
from kt_core.runtime.device_check import check_plan_devices


def two_gpu_plan(registry, device_map: list[str] = ()):
    model = meta_model(deepseek_v2_config(num_hidden_layers=16))
    rules = load_rules(find_rule_file("deepseek-v2-lite-2gpu"), registry)
    return plan(model, rules, device_map=DeviceMap.parse(device_map))


def test_no_cuda_device(registry):
    with pytest.raises(KtUserError) as info:
        check_plan_devices(two_gpu_plan(registry), cuda_device_count=lambda: 0)
    message = str(info.value)
    assert message.startswith("the plan uses cuda:0, cuda:1 (first cuda:0 at model, by the rule at ")
    assert "deepseek-v2-lite-2gpu.yaml:7:3" in message
    assert "this machine has no CUDA device" in message
    assert message.endswith("--device-map cuda:0=cpu --device-map cuda:1=cpu")


def test_one_gpu_for_a_two_gpu_file(registry):
    with pytest.raises(KtUserError, match=r"uses cuda:1 .* has 1 CUDA device\(s\) .*--device-map cuda:1=cuda:0$"):
        check_plan_devices(two_gpu_plan(registry), cuda_device_count=lambda: 1)


def test_devices_that_exist_or_are_remapped_pass(registry):
    check_plan_devices(two_gpu_plan(registry), cuda_device_count=lambda: 2)
    check_plan_devices(two_gpu_plan(registry, ["cuda=cpu"]), cuda_device_count=lambda: 0)
    # A partial remap leaves cuda:1 (layers 14 and up, and the transfer_map) in the plan.
    remapped = two_gpu_plan(registry, ["cuda:0=cpu"])
    with pytest.raises(KtUserError, match="uses cuda:1"):
        check_plan_devices(remapped, cuda_device_count=lambda: 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's message")
def test_gpu_rule_file_on_a_cpu_only_machine_exits_2(tmp_path, tokenizer, capsys):
    from tiny_models import random_model

    random_model(deepseek_v2_config(vocab_size=len(tokenizer), q_lora_rank=None)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--rules", "deepseek-v2-lite-gpu", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "this machine has no CUDA device" in err and "--device-map cuda:0=cpu" in err
