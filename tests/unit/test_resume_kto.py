"""Kill a KTO run with SIGKILL mid-epoch, resume, and land on the same adapter as an uninterrupted run, with the same
metrics logged for every step and against the same reference (tests/preference_resume.py): here train.init_adapter,
whose frozen copy a resume must keep rather than take the checkpoint's trained adapter or the base for it. KTO reads
its answers in one seeded order, each paired with a fixed KL answer of its micro-batch, so the resumed run must also
go on from the same answer with the same partners."""

from __future__ import annotations

import pytest

from tests.preference_resume import Recipe, resumed_from_start_adapter

ANSWERS = 40
KTO = Recipe(
    "kto",
    [
        {
            "messages": [
                {"role": "user", "content": f"question {i}?"},
                {"role": "assistant", "content": f"answer {i % 7}." if i % 2 else f"no {i % 5}, never."},
            ],
            "label": bool(i % 2),
        }
        for i in range(ANSWERS)
    ],
    "micro_batch_size: 2, grad_accum: 1",  # KTO's KL term needs another answer in the micro batch
    ANSWERS // 2,
)


@pytest.mark.slow
def test_kto_sigkill_then_resume_from_an_init_adapter_equals_uninterrupted(tmp_path, tiny_model_dir):
    resumed_from_start_adapter(tmp_path, tiny_model_dir, KTO)
