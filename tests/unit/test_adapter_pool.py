"""One base, many adapters (issue 31 item 1): every adapter system of a process runs on one shared copy of its base,
the base answers with adapters off as the plain model does, one batch carries rows of different adapters with the
answers each gives alone, and at most `max_adapters` stay loaded, the coldest unloaded and reloaded on demand."""

from __future__ import annotations

import copy
import gc
import threading

import pytest
import torch

from tuneforge.config import load_experiment
from tuneforge.engine.batcher import Batcher
from tuneforge.engine.pool import Pool
from tuneforge.engine.transformers import Engine, Settings
from tuneforge.run import RunDir
from tuneforge.systems import Systems

CHATS = [
    [{"role": "user", "content": "What is two plus two?"}],
    [{"role": "user", "content": "Say hello world to the thermostat schedule"}],
    [{"role": "user", "content": "Capital?"}],
    [{"role": "user", "content": "The capital of France is Paris. Classify the sentiment of a review: positive"}],
]
GREEDY = Settings(max_new_tokens=10)


def _adapter(folder, model, tokenizer, seed: int, dora: bool = False):
    """A LoRA adapter with random weights on every linear layer (its answers differ from the base's), saved as
    training saves one: weights, config, tokenizer."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, use_dora=dora)
    peft = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    peft.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory, talking_llama, tiny_tokenizer):
    """The tiny model as a local model folder, and four adapters of it (the last one DoRA)."""
    root = tmp_path_factory.mktemp("pool")
    base = root / "base"
    talking_llama.save_pretrained(base)
    tiny_tokenizer.save_pretrained(base)
    adapters = [_adapter(root / f"adapter{i}", talking_llama, tiny_tokenizer, seed=i) for i in range(3)]
    adapters.append(_adapter(root / "dora", talking_llama, tiny_tokenizer, seed=7, dora=True))
    path = root / "exp.yaml"
    path.write_text(f"name: pool\nmodel: {{ref: {base}, device: cpu}}\ndata: {{train: x.jsonl}}\n")
    experiment = load_experiment(path)
    return experiment, RunDir(experiment, root / "run"), base, adapters


def _alone(folder, base_folder, tokenizer, adapter=None) -> Engine:
    """The system as an engine of its own: a fresh copy of the base, with the adapter through PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return Engine(model, tokenizer, "alone")


def _answers(engine, chats=CHATS) -> list[str]:
    return [engine.generate([c], GREEDY, batch_size=1)[0].text for c in chats]


def test_adapter_systems_share_one_copy_of_the_base(models, tiny_tokenizer):
    experiment, run, _, adapters = models
    systems = Systems(experiment, run, pool=Pool())
    plain = systems.get("base").engine
    weight = plain.base.model.model.layers[0].self_attn.q_proj.weight
    pointer = weight.data_ptr()
    first, second = (systems.get(f"adapter:{a}").engine for a in adapters[:2])
    _answers(first, CHATS[:1]), _answers(second, CHATS[:1])  # both adapters loaded onto the base
    assert first.base is second.base is plain.base
    peft = plain.base.model
    assert len(peft.peft_config) == 2
    layer = peft.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight is weight and layer.base_layer.weight.data_ptr() == pointer  # the same tensor


@pytest.mark.slow
def test_the_base_answers_with_adapters_off_as_the_plain_model(models, tiny_tokenizer):
    experiment, run, base_folder, adapters = models
    plain = _alone(None, base_folder, tiny_tokenizer)
    systems = Systems(experiment, run, pool=Pool())
    for adapter in adapters[:2]:
        _answers(systems.get(f"adapter:{adapter}").engine, CHATS[:1])  # adapters loaded, the last one active in PEFT
    pooled = systems.get("base").engine
    assert pooled.base.has_adapters
    assert _answers(pooled) == _answers(plain)
    assert [a.text for a in pooled.generate(CHATS, GREEDY, batch_size=4)] == _answers(plain)
    ids = torch.tensor([pooled.prompt_ids(CHATS[0])])
    scorer = systems.scorer("base").model  # eval's teacher-forced scoring goes through the same base
    assert torch.equal(scorer(input_ids=ids).logits, plain.model(input_ids=ids).logits)


@pytest.mark.slow
def test_each_adapter_answers_as_it_does_on_a_base_of_its_own(models, tiny_tokenizer):
    experiment, run, base_folder, adapters = models
    systems = Systems(experiment, run, pool=Pool())
    base_answers = _answers(systems.get("base").engine)
    for adapter in (adapters[0], adapters[3]):  # LoRA, DoRA
        pooled = systems.get(f"adapter:{adapter}").engine
        own = _alone(None, base_folder, tiny_tokenizer, adapter)
        alone = _answers(own, CHATS[:2])
        assert _answers(pooled, CHATS[:2]) == alone
        assert alone != base_answers[:2]  # the adapter changes the answers, so the comparison means something
        ids = torch.tensor([pooled.prompt_ids(CHATS[1])])
        scored = systems.scorer(f"adapter:{adapter}").model(input_ids=ids).logits  # eval's scoring: its adapter
        assert torch.allclose(scored, own.model(input_ids=ids).logits, atol=1e-5)


def _first_batch_waits_for(monkeypatch, count: int) -> None:
    """The batcher's first batch starts only once `count` requests are queued (see test_engine.py)."""
    original = Batcher._next_batch
    first = [True]

    def gated(self):
        if first[0]:
            with self.ready:
                self.ready.wait_for(lambda: len(self.waiting) >= count, timeout=60)
            first[0] = False
        return original(self)

    monkeypatch.setattr(Batcher, "_next_batch", gated)


def _concurrently(calls):
    results: list = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i):
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


@pytest.mark.slow
def test_one_batch_carries_rows_of_different_adapters_each_answered_as_alone(models, monkeypatch):
    experiment, run, _, adapters = models
    systems = Systems(experiment, run, pool=Pool())
    names = ["base", *(f"adapter:{a}" for a in adapters[:3])] * 2
    chats = [CHATS[i % 3] for i in range(len(names))]
    alone = [_answers(systems.get(n).engine, [c])[0] for n, c in zip(names, chats)]
    assert len({_answers(systems.get(n).engine, CHATS[:1])[0] for n in names}) == 4  # each system answers its own way
    _first_batch_waits_for(monkeypatch, len(names))
    batcher = systems.get("base").engine.batcher()
    assert all(systems.get(n).engine.batcher() is batcher for n in names)  # one batcher for the base
    together = _concurrently([lambda n=n, c=c: systems.get(n).engine.answer(c, GREEDY) for n, c in zip(names, chats)])
    assert batcher.batches == 1  # base and three adapters in one generate call
    assert [a.text for a in together] == alone


def test_a_dora_adapter_runs_in_batches_of_its_own_and_answers_as_alone(models, monkeypatch):
    experiment, run, _, adapters = models
    systems = Systems(experiment, run, pool=Pool())
    names = [f"adapter:{adapters[0]}", f"adapter:{adapters[3]}", "base", f"adapter:{adapters[3]}"]
    alone = [_answers(systems.get(n).engine, [CHATS[i]])[0] for i, n in enumerate(names)]
    _first_batch_waits_for(monkeypatch, len(names))
    batcher = systems.get("base").engine.batcher()
    together = _concurrently(
        [lambda i=i, n=n: systems.get(n).engine.answer(CHATS[i], GREEDY) for i, n in enumerate(names)]
    )
    assert [a.text for a in together] == alone
    assert batcher.batches == 2  # PEFT mixes no DoRA adapter with others: the two DoRA rows went together


def test_the_least_recently_used_adapter_is_unloaded_and_reloaded_on_demand(models):
    experiment, run, _, adapters = models
    systems = Systems(experiment, run, pool=Pool(), max_adapters=2)
    engines = [systems.get(f"adapter:{a}").engine for a in adapters[:3]]
    base = engines[0].base
    first = _answers(engines[0])
    _answers(engines[1], CHATS[:1])
    _answers(engines[0], CHATS[:1])  # adapter 0 used again: adapter 1 is now the coldest
    assert base.loaded() == [str(adapters[1]), str(adapters[0])] and base.loads == 2
    _answers(engines[2], CHATS[:1])
    assert base.loaded() == [str(adapters[0]), str(adapters[2])]  # adapter 1 unloaded
    assert len(base.model.peft_config) == 2
    second = _answers(engines[1])  # loaded again when asked for
    assert base.loads == 4 and base.loaded() == [str(adapters[2]), str(adapters[1])]
    assert second == _answers(systems.get(f"adapter:{adapters[1]}").engine)
    assert _answers(engines[0]) == first  # and adapter 0, unloaded by that, reloads with the same answers


def test_memory_does_not_grow_by_a_base_per_adapter(models):
    from transformers import LlamaForCausalLM

    experiment, run, _, adapters = models
    gc.collect()
    before = sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects())
    systems = Systems(experiment, run, pool=Pool())
    for adapter in adapters:
        _answers(systems.get(f"adapter:{adapter}").engine, CHATS[:1])
    _answers(systems.get("base").engine, CHATS[:1])
    gc.collect()
    assert sum(isinstance(o, LlamaForCausalLM) for o in gc.get_objects()) == before + 1  # one base for five systems
    model = systems.get("base").engine.base.model
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    assert adapter_bytes < 0.5 * base_bytes  # four adapters' weights, no copy of the base's
    tokenizers = {id(systems.get(f"adapter:{a}").engine.tokenizer) for a in adapters}
    assert len(tokenizers) == 1  # adapters saved with one tokenizer share its object (~33 MB each for SmolLM2's)


def test_an_adapter_retrained_in_place_is_loaded_anew(models, tmp_path, talking_llama, tiny_tokenizer):
    import shutil
    import time

    experiment, run, _, adapters = models
    folder = tmp_path / "retrained"
    shutil.copytree(adapters[0], folder)
    systems = Systems(experiment, run, pool=Pool())
    engine = systems.get(f"adapter:{folder}").engine
    before = _answers(engine)
    time.sleep(0.01)
    _adapter(folder, talking_llama, tiny_tokenizer, seed=1)  # the same folder, other weights
    assert _answers(engine) == _answers(systems.get(f"adapter:{adapters[1]}").engine) != before
    assert engine.base.loaded() == [str(folder.resolve()), str(adapters[1].resolve())]  # the old weights unloaded


def test_serve_takes_the_adapter_budget_from_the_command_line():
    from tuneforge.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "x.yaml", "--max-adapters", "3"]).max_adapters == 3
    assert parser.parse_args(["serve", "x.yaml"]).max_adapters == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "x.yaml", "--max-adapters", "0"])
