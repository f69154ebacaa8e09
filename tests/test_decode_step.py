"""The model's one pass over new tokens (`Transformer.step`), as the PyTorch decoders run it: its attention
reads the KV cache in place (views of it, never a gathered copy), and no more of it than the call's rows
and positions need (the `pytorch` decoder: the rows from the lowest to the highest and positions up to the
highest; the `static` one: every row and a power-of-two bucket); prompts run through it in chunks with
the hidden states of a prompt run at once."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from llama_mp.runtime import model as model_module

# What may read the KV cache in a step: views of it, and the products and attention kernels that read them.
# Anything else (aten.index, index_select, gather, clone, contiguous, repeat_interleave, cat, ...) copies
# cache entries. Writing the new tokens' keys and values into it (index_put_, copy_) is fine: those take the
# cache as the tensor they write, and only that one may alias it.
READ_IN_PLACE = {"aten.slice.Tensor", "aten.select.int", "aten.view.default", "aten.expand.default",
                 "aten.transpose.int", "aten.unsqueeze.default", "aten.as_strided.default", "aten.alias.default",
                 "aten.bmm.default", "aten._scaled_dot_product_flash_attention_for_cpu.default"}
WRITES = {"aten.index_put_.default", "aten.copy_.default"}
class CacheUse(TorchDispatchMode):
    """Records every operator that gets a tensor sharing memory with a KV cache, and the shape of each view
    of the cache cut along its positions axis (what attention then reads). Under no_grad (not
    inference_mode) composite operators such as matmul and reshape reach the mode as what they run (bmm,
    view, or the clone a reshape falls back to)."""

    def __init__(self, caches):
        super().__init__()
        self.storages = {c.untyped_storage().data_ptr() for c in caches}
        self.ops, self.views = set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        out = func(*args, **(kwargs or {}))
        aliases = [isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.storages for t in flat]
        if any(aliases):
            name = str(func)
            self.ops.add(name if name not in WRITES or any(aliases[1:]) else "write")
            if func is torch.ops.aten.slice.Tensor and args[1] == 2:  # [rows, kv_heads, positions, head_dim]
                self.views.add(tuple(out.shape))
        return out


def _read(model, call):
    """(operators touching the KV caches, the views of them that attention read) in `call()`."""
    use = CacheUse([c for layer in model.layers for c in (layer.attention.cache_k, layer.attention.cache_v)])
    with torch.no_grad(), use:
        call()
    return use.ops, use.views


@pytest.mark.parametrize("decoder", ["pytorch", "static"])
def test_a_step_reads_the_cache_in_place_and_only_what_its_positions_need(make_checkpoint, tokenizer_path,
                                                                          decoder):
    import workers

    ckpt_dir, args, _ = make_checkpoint(n_heads=8, n_kv_heads=4)  # GQA: two queries share each kv head
    llama = workers.build(ckpt_dir, tokenizer_path, max_seq_len=64, max_batch_size=4, decoder=decoder)
    model = llama.model
    kv, hd = args.n_kv_heads, args.dim // args.n_heads
    with torch.inference_mode():
        for slot in range(4):
            model.hidden_in_slot(torch.tensor([[1, 5, 7, 9, 11][:slot + 2]]), slot)
    static = decoder == "static"
    calls = {  # what each call reads: (rows, positions) of the cache
        "generate's step": (lambda: model.hidden(torch.tensor([[3], [4]]), 9), (4 if static else 2, 16 if static else 10)),
        "rows out of order": (lambda: model.hidden_rows(torch.tensor([[3], [4]]), torch.tensor([3, 1]),
                                                        torch.tensor([5, 2])), (4 if static else 3, 16 if static else 6)),
        "a prompt after its cache": (lambda: model.hidden(torch.tensor([[3, 4, 5]]), 3), (1, 6)),
        "a prompt in its slot": (lambda: model.hidden_in_slot(torch.tensor([[3, 4, 5, 6]]), 2), (1, 4)),
    }
    for name, (call, (rows, positions)) in calls.items():
        ops, views = _read(model, call)
        assert ops - {"write"} <= READ_IN_PLACE, f"{name}: {sorted(ops - READ_IN_PLACE - {'write'})} copy the KV cache"
        assert views == {(rows, kv, positions, hd)}, f"{name} read {views}"


def test_the_static_span_is_a_power_of_two_above_the_last_position(make_checkpoint, tokenizer_path):
    import workers

    llama = workers.build(make_checkpoint()[0], tokenizer_path, max_seq_len=100, max_batch_size=1, decoder="static")
    model, decoder = llama.model, llama.model.decoder
    spans = {p: decoder.span(model, p) for p in range(100)}
    assert all(p < span <= max(16, 2 * p) for p, span in spans.items() if span < 100)  # never twice the need
    assert sorted(set(spans.values())) == [16, 32, 64, 100]  # a handful of shapes; the last one is the cache


def test_a_prompt_in_chunks_gives_what_the_whole_prompt_gives(make_checkpoint, tokenizer_path, monkeypatch):
    """`Transformer.prefill` runs a prompt PREFILL_CHUNK positions per step; chunks of 3 (the later ones
    masked against the cache before them) give the hidden states, and then the ids, of one step."""
    import workers

    ckpt_dir, args, _ = make_checkpoint(n_heads=8, n_kv_heads=4)
    llama = workers.build(ckpt_dir, tokenizer_path, max_seq_len=32, max_batch_size=2, decoder="pytorch")
    model = llama.model
    # Llama 2 ids, within the vocabulary of whichever tokenizer the tests have (a tiny one without ../shared)
    prompts = [[t % args.vocab_size for t in ids] for ids in
               ([1, 306, 4658, 29871, 12, 450, 4996, 17354], [1, 15043, 3, 9, 27, 81, 5, 44])]

    def run():
        with torch.inference_mode():
            h = model.hidden(torch.tensor(prompts), 0, all_positions=True)
        return h, llama.generate(prompts, 6, temperature=0)[0]

    (whole, ids), calls = run(), []
    step = model.step
    monkeypatch.setattr(model, "step", lambda *a, **k: calls.append(a[0].shape[1]) or step(*a, **k))
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 3)
    chunked, chunked_ids = run()
    assert calls[:3] == [3, 3, 2]  # the prompt took three steps
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)
    assert chunked_ids == ids
