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
