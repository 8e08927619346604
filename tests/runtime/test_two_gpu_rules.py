"""The shipped two-GPU rule file, unmodified, on a CPU-only machine through --device-map.

`deepseek-v2-lite-2gpu` splits the layers at 14 (KDeepseekV2Model's transfer_map), so the
tiny model here has 16 layers: both halves and the boundary are exercised. Remapped to
the CPU it must give exactly the tokens of the CPU-only rule file and of transformers
(float32 everywhere; see test_generate.py for why greedy tokens must be identical).
"""

from __future__ import annotations

import json

from conftest import hf_greedy
from tiny_models import deepseek_v2_config, random_model

from kt_core.cli.main import main

PROMPT = "Mixture-of-Experts models route every token"


def test_shipped_two_gpu_file_remapped_to_cpu_gives_the_cpu_tokens(tmp_path, tokenizer, capsys):
    model = random_model(deepseek_v2_config(vocab_size=len(tokenizer), q_lora_rank=None, num_hidden_layers=16), seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    base = ["generate", "--model", str(tmp_path), "--prompt", PROMPT, "--max-new-tokens", "16", "--dtype", "float32",
            "--json"]

    def tokens(*args: str) -> list[int]:
        assert main([*base, *args]) == 0
        return json.loads(capsys.readouterr().out)["tokens"]

    cpu = tokens("--rules", "deepseek-v2-lite-cpu-torch")
    assert cpu == hf_greedy(model, tokenizer.encode(PROMPT), 16)
    assert tokens("--rules", "deepseek-v2-lite-2gpu", "--device-map", "cuda:0=cpu", "--device-map", "cuda:1=cpu") == cpu

    # The plan really is the two-GPU one, remapped: layer 14 is where the transfer_map switches.
    assert main(["rules", "explain", "deepseek-v2-lite-2gpu", "--model", str(tmp_path), "--json",
                 "--device-map", "cuda:0=cpu"]) == 0
    rows = {r["module"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["model.layers.13.self_attn"]["device"] == "cpu"
    assert rows["model.layers.14.self_attn"]["device"] == "cuda:1"


def _cache_devices(device_map: list[str], path, tokenizer) -> tuple[list[str], list[str], object, list[int]]:
    """Load the two-GPU file through the runtime; return (planned attention devices, cache devices, config, tokens)."""
    import torch

    from kt_core.devices import DeviceMap
    from kt_core.plugins import get_registry
    from kt_core.rules import load_rules
    from kt_core.rules.shipped import find_rule_file
    from kt_core.runtime.generate import Session
    from kt_core.runtime.load import load_model
    from kt_core.runtime.model_source import open_model

    registry = get_registry()
    inputs = open_model(str(path), None, registry)
    loaded = load_model(inputs.config, load_rules(find_rule_file("deepseek-v2-lite-2gpu"), registry), inputs.source,
                        registry, device_map=DeviceMap.parse(device_map), dtype=torch.float32, show_progress=False)
    session = Session(loaded.model, loaded.config, 64)
    logits, _ = session.prefill(tokenizer.encode(PROMPT))
    tokens = [int(logits.argmax())]
    for _ in range(3):
        tokens.append(int(session.decode(tokens[-1]).argmax()))
    layers = range(loaded.config.num_hidden_layers)
    planned = [str(torch.device(loaded.plan[f"model.layers.{i}.self_attn"].device)) for i in layers]
    cached = [str(session.cache.layers[i].keys.device) for i in layers]
    config = loaded.config
    for layer in session.cache.layers:  # only MLA's compressed latent, one "head", is cached
        assert tuple(layer.keys.shape) == (1, 1, 64, config.kv_lora_rank)
        assert tuple(layer.values.shape) == (1, 1, 64, config.qk_rope_head_dim)
    return planned, cached, config, tokens


def test_static_cache_layers_live_on_their_layers_device(tmp_path, tokenizer):
    """Each cache layer is allocated where its attention runs (and holds only the latent).

    On a CPU-only machine both halves map to the CPU; with a GPU, ``cuda:0=cpu`` and
    ``cuda:1=cuda:0`` put layers 0-13 on the CPU and 14-15 on the GPU, so the check is
    between two real devices and the tokens must still be the CPU ones.
    """
    import torch

    model = random_model(deepseek_v2_config(vocab_size=len(tokenizer), q_lora_rank=None, num_hidden_layers=16), seed=1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    planned, cached, _, cpu_tokens = _cache_devices(["cuda:0=cpu", "cuda:1=cpu"], tmp_path, tokenizer)
    assert cached == planned == ["cpu"] * 16
    if torch.cuda.is_available():
        planned, cached, _, tokens = _cache_devices(["cuda:0=cpu", "cuda:1=cuda:0"], tmp_path, tokenizer)
        assert planned == ["cpu"] * 14 + ["cuda:0"] * 2
        assert cached == planned
        assert tokens == cpu_tokens
