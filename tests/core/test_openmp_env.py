"""`kt` sets OMP_WAIT_POLICY=PASSIVE before torch loads, and never over the user's choice."""

from __future__ import annotations

import os
import subprocess
import sys

from kt_core.cli.openmp_env import WAIT_POLICY, prefer_passive_openmp


def test_sets_passive_when_unset_and_keeps_the_users_value():
    environ: dict[str, str] = {}
    prefer_passive_openmp(environ)
    assert environ == {WAIT_POLICY: "PASSIVE"}
    mine = {WAIT_POLICY: "ACTIVE"}
    assert prefer_passive_openmp(mine) is False and mine == {WAIT_POLICY: "ACTIVE"}


def test_the_entry_point_module_leaves_torch_unloaded_so_the_setting_takes_effect():
    """libgomp reads the variable when torch loads it: the CLI module must not import torch."""
    script = (
        "import sys, os\n"
        "import kt_core.cli.main\n"
        "from kt_core.cli.openmp_env import prefer_passive_openmp\n"
        "print('torch' in sys.modules, prefer_passive_openmp(), os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != WAIT_POLICY}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "True", "PASSIVE"]
