"""Kill a DPO run with SIGKILL mid-epoch, resume, and land on the same adapter as an uninterrupted run, against the
same reference (tests/preference_resume.py): the base with a fresh adapter, or train.init_adapter."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from tests.preference_resume import (
    Recipe,
    interrupted_and_straight,
    references_after_the_resume,
    resumed_from_start_adapter,
)

PAIRS = 80
DPO = Recipe(
    "dpo",
    [
        {
            "input": {"messages": [{"role": "user", "content": f"question {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": f"answer {i % 7}."}],
            "non_preferred_output": [{"role": "assistant", "content": f"no {i % 5}, never."}],
        }
        for i in range(PAIRS)
    ],
    "micro_batch_size: 1, grad_accum: 2",
    PAIRS // 2,  # 1 pair per micro batch, 2 accumulated, one epoch
)


@pytest.mark.slow
def test_dpo_sigkill_then_resume_equals_uninterrupted_against_the_base(tmp_path, tiny_model_dir):
    straight, killed, newest = interrupted_and_straight(tmp_path, tiny_model_dir, DPO)
    adapter = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # trained away from the start (0)
    # the reference is a frozen copy of the fresh adapter, whose lora_B is 0: exactly the base with the adapter off
    reference = references_after_the_resume(straight, killed, newest, DPO.steps)
    assert all(not t.any() for k, t in reference.items() if "lora_B" in k)


@pytest.mark.slow
def test_dpo_sigkill_then_resume_from_an_init_adapter_keeps_its_frozen_reference(tmp_path, tiny_model_dir):
    resumed_from_start_adapter(tmp_path, tiny_model_dir, DPO)
