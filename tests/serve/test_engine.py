"""The inference engine in-process: adapters by name with least-recently-used eviction, the idle
unload that hands the device back, and a model that does not load failing its requests only."""

from __future__ import annotations

import time

import pytest
import torch

from dpo_lora.core.config import load_config
from dpo_lora.model.decode import Sampling
from dpo_lora.serve.engine import Engine, EngineError, Request


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two random LoRA adapters of the tiny Llama, saved in PEFT's format."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = []
    for seed in (1, 2):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # fmt: skip
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.5)
        folder = tmp_path_factory.mktemp(f"adapter{seed}")
        model.save_pretrained(folder)
        folders.append(folder)
    return folders


def dora_adapter(tiny_model_dir, folder, targets: list[str]):
    """A random DoRA adapter of the tiny Llama (B not zero: it changes the answers), saved in `folder`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4, target_modules=targets, use_dora=True))  # fmt: skip
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


def settings(tiny_model_dir):
    return load_config(None, {"model.path": str(tiny_model_dir), "model.quantization": "none", "model.dtype": "float32"}).model  # fmt: skip


def answer(engine: Engine, adapter, prompt=(5, 6, 7, 8)) -> str:
    request = Request([list(prompt)], 1, Sampling(temperature=0, max_tokens=6), adapter, str(adapter))
    engine.submit(request)
    texts = []
    while (event := request.events.get(timeout=60))[0] != "done":
        if event[0] == "error":
            raise event[1]
        if event[0] == "text":
            texts.append(event[2])
    return "".join(texts)


def test_one_adapter_slot_evicts_the_least_recently_used_and_answers_stay_the_same(tiny_model_dir, adapters):
    roomy = Engine(settings(tiny_model_dir), lambda: "cpu", max_adapters=8)
    want = {folder: answer(roomy, folder) for folder in [None, *adapters]}
    assert len(set(want.values())) == 3, "base and two adapters answer differently"
    assert list(roomy.adapters) == adapters
    tight = Engine(settings(tiny_model_dir), lambda: "cpu", max_adapters=1)
    for folder in [adapters[0], adapters[1], adapters[0], None, adapters[1]]:
        assert answer(tight, folder) == want[folder]
        if folder is not None:
            assert list(tight.adapters) == [folder], "only the newest adapter is held"
    held = [name for name in tight.model.peft_config]
    assert held == [tight.adapters[adapters[1]]], "the evicted ones left the model too"
    roomy.close(), tight.close()


def test_an_idle_engine_unloads_and_hands_its_device_back_then_reloads(tiny_model_dir, adapters):
    placed, released = [], []
    engine = Engine(settings(tiny_model_dir), lambda: placed.append("cpu") or "cpu", idle_s=0.3, on_unload=lambda: released.append(1))  # fmt: skip
    first = answer(engine, adapters[0])
    deadline = time.monotonic() + 10
    while not released:
        assert time.monotonic() < deadline, "the idle engine kept its model"
        time.sleep(0.05)
    assert released == [1] and engine.model is None
    assert answer(engine, adapters[0]) == first, "loaded again on the next request"
    assert placed == ["cpu", "cpu"]
    engine.close()


def test_a_missing_adapter_fails_its_request_and_the_engine_serves_on(tiny_model_dir, adapters, tmp_path):
    engine = Engine(settings(tiny_model_dir), lambda: "cpu")
    with pytest.raises(EngineError, match="the model did not load"):
        answer(engine, tmp_path / "gone")
    want = answer(engine, adapters[1])
    # In one batch with a good request: only the bad one fails.
    bad, good = (Request([[5, 6, 7, 8]], 1, Sampling(temperature=0, max_tokens=6), a, "m") for a in (tmp_path / "gone", adapters[1]))  # fmt: skip
    with engine.ready:
        engine.waiting.extend([bad, good])
        engine.ready.notify()
    assert bad.events.get(timeout=60)[0] == "error"
    texts = []
    while (event := good.events.get(timeout=60))[0] != "done":
        texts += [event[2]] if event[0] == "text" else []
    assert "".join(texts) == want
    engine.close()


def test_a_full_queue_is_a_429_and_nothing_queued_is_lost(tiny_model_dir, monkeypatch):
    from dpo_lora.serve import engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_WAITING", 2)
    engine = Engine(settings(tiny_model_dir), lambda: "cpu")
    with engine.ready:  # hold the worker off while the queue fills
        queued = [Request([[5, 6]], 1, Sampling(temperature=0, max_tokens=2), None, "base") for _ in range(2)]
        for request in queued:
            engine.waiting.append(request)
        with pytest.raises(EngineError, match="2 requests already wait") as caught:
            engine.submit(Request([[5, 6]], 1, Sampling(temperature=0, max_tokens=2), None, "base"))
        assert caught.value.status == 429
        engine.ready.notify()
    for request in queued:
        while (event := request.events.get(timeout=60))[0] != "done":
            assert event[0] != "error"
    engine.close()


def test_a_batch_with_a_dora_adapter_answers_each_request_as_it_answers_alone(tiny_model_dir, adapters, tmp_path):
    """PEFT runs DoRA only as the active adapter: a batch mixing it with others decodes by adapter
    in turn, and every request still gets its own answer."""
    folders = [None, adapters[0], dora_adapter(tiny_model_dir, tmp_path / "dora", ["q_proj", "v_proj", "down_proj"])]
    engine = Engine(settings(tiny_model_dir), lambda: "cpu", max_adapters=8)
    alone = {folder: answer(engine, folder) for folder in folders}
    assert len(set(alone.values())) == 3, "base, LoRA and DoRA answer differently"
    requests = [Request([[5, 6, 7, 8]], 1, Sampling(temperature=0, max_tokens=6), f, str(f)) for f in folders]
    engine._answer(requests)  # one batch, as _next_batch would form it from three waiting requests
    for folder, request in zip(folders, requests, strict=True):
        events = []
        while (event := request.events.get(timeout=60))[0] != "done":
            events.append(event)
        assert "".join(e[2] for e in events if e[0] == "text") == alone[folder], folder


def test_a_request_arriving_mid_decode_joins_the_batch_and_ends_before_the_long_one(tiny_model_dir, adapters):
    """Continuous batching: a short request sent while a long one decodes joins between steps
    (another adapter, another prompt length), ends and is done while the long one still decodes,
    and both get the answers they get alone."""
    engine = Engine(settings(tiny_model_dir), lambda: "cpu", max_adapters=8)
    long_prompt, short_prompt = [5, 6, 7, 8, 9, 10, 11], [12, 13]
    alone_long = answer(engine, adapters[0], long_prompt)
    alone_short = answer(engine, adapters[1], short_prompt)
    long = Request([long_prompt], 1, Sampling(temperature=0, max_tokens=40), adapters[0], "long")
    engine.submit(long)
    first = long.events.get(timeout=60)
    assert first[0] == "text", first
    short = Request([short_prompt], 1, Sampling(temperature=0, max_tokens=6), adapters[1], "short")
    engine.submit(short)  # the long request is decoding now
    texts, order = {"long": [first[2]], "short": []}, []
    while len(order) < 2:
        for name, request in (("long", long), ("short", short)):
            while not request.events.empty():
                event = request.events.get()
                if event[0] == "text":
                    texts[name].append(event[2])
                if event[0] == "done":
                    order.append(name)
        time.sleep(0.01)
    assert order == ["short", "long"], "the short request ended while the long one still decoded"
    assert "".join(texts["short"]) == alone_short
    assert "".join(texts["long"]).startswith(alone_long), "the first 6 tokens as alone"


def test_a_dora_request_arriving_mid_decode_waits_for_the_next_batch(tiny_model_dir, adapters, tmp_path):
    """PEFT can't run DoRA beside other adapters: it does not join; it is answered right after."""
    dora_adapter(tiny_model_dir, tmp_path / "dora", ["q_proj"])
    engine = Engine(settings(tiny_model_dir), lambda: "cpu", max_adapters=8)
    alone = answer(engine, tmp_path / "dora")
    long = Request([[5, 6, 7]], 1, Sampling(temperature=0, max_tokens=30), adapters[0], "long")
    engine.submit(long)
    assert long.events.get(timeout=60)[0] == "text"
    dora = Request([[5, 6, 7, 8]], 1, Sampling(temperature=0, max_tokens=6), tmp_path / "dora", "dora")
    engine.submit(dora)
    while (event := long.events.get(timeout=60))[0] != "done":
        assert dora.events.empty() or event[0] != "text", "nothing of the DoRA answer while the LoRA batch runs"
    texts = []
    while (event := dora.events.get(timeout=60))[0] != "done":
        assert event[0] != "error", event
        texts.append(event[2] if event[0] == "text" else "")
    assert "".join(texts) == alone


def test_a_batch_takes_in_at_most_max_rows_per_batch_rows_then_drains(tiny_model_dir, adapters, monkeypatch):
    """Under steady traffic a batch would never end and what it keeps of ended rows would grow:
    past MAX_ROWS_PER_BATCH rows taken in it admits no more, and the next request waits for it."""
    import dpo_lora.serve.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_ROWS_PER_BATCH", 2)
    engine = Engine(settings(tiny_model_dir), lambda: "cpu", max_adapters=8)
    answer(engine, None)  # loaded
    long = Request([[5, 6, 7]], 1, Sampling(temperature=0, max_tokens=40), None, "long")
    engine.submit(long)
    assert long.events.get(timeout=60)[0] == "text"
    second = Request([[8, 9]], 1, Sampling(temperature=0, max_tokens=2), None, "second")
    third = Request([[10, 11]], 1, Sampling(temperature=0, max_tokens=2), None, "third")
    engine.submit(second)
    engine.submit(third)
    order = []
    while len(order) < 3:
        for name, request in (("long", long), ("second", second), ("third", third)):
            while not request.events.empty():
                if request.events.get()[0] == "done":
                    order.append(name)
        time.sleep(0.01)
    assert order == ["second", "long", "third"], order
