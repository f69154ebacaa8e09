"""No host sync in a decode step (issue 21, item 2), checked on a CPU.

Reading a value the device computed on the host (`.item()`, `.tolist()`, `bool()`, `.cpu()`, printing it)
makes a GPU's host wait until everything queued so far has run, and the device then idles until the host
queues more. Here every tensor a step computes is followed: a TorchFunctionMode marks the model's weights,
cache and tables, and the outputs (and in-place targets) of every operation with a marked input; each host
read of a marked tensor is counted, during the decode steps of `Engine.generate` and of the server's batch
loop, with the PyTorch decoders (what a GPU runs). The one sanctioned way to the host is `Readback`: its
copies are not counted, and each is checked to be read after the next step was queued (one step late).

What this cannot see: a read of a device tensor that holds only values the host put there (on a CPU the
two are the same tensors); the code has no reason to read those back.
"""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from llama_mp import distributed
from llama_mp.runtime import sampling, transfer
from llama_mp.runtime.batching import Batcher
from llama_mp.server.protocol import Choosing, SequenceSpec
from llama_mp.server.scheduler import Scheduler
from scheduling import run_to_end

MARK = "_computed_on_device"
IN_PLACE_OPERATORS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                      "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
# Tensor methods and torch functions that read values on the host (the GPU's host waits for them).
READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__complex__",
         "__array__", "__repr__", "__str__", "__format__", "__contains__", "__reduce_ex__", "equal", "allclose",
         "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "repeat_interleave"}


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _marked(t) -> bool:
    return getattr(t, MARK, False)


def _mark(t) -> None:
    setattr(t, MARK, True)


class Syncs(TorchFunctionMode):
    """Counts host reads of computed tensors, and logs each with the decode step it happened in."""

    def __init__(self):
        super().__init__()
        self.log = []       # ("step", n) | ("read", name, step) | ("late", made_in_step, step)
        self.steps = 0
        self.counting = True
        self.inside = ""    # a function the test follows, while it runs

    def reads(self):
        return [e for e in self.log if e[0] == "read"]

    def uploads(self):
        return [e for e in self.log if e[0] == "upload"]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(_tensors(args)) + list(_tensors(kwargs))
        computed = any(_marked(t) for t in inputs)
        boolean_index = name in ("__getitem__", "__setitem__") and any(
            t.dtype == torch.bool and _marked(t) for t in _tensors(args[1:2]))
        copy_out = name in ("to", "cpu") and kwargs.get("non_blocking") is not True
        if self.counting and computed and (name in READS or boolean_index or
                                           (copy_out and name == "to" and _to_host(args, kwargs))):
            self.log.append(("read", name, self.steps) + ((self.inside,) if self.inside else ()))
        if self.counting and _blocking_upload(name, args, kwargs):
            self.log.append(("upload", name, self.steps))
        out = func(*args, **kwargs)
        if computed:
            for t in _tensors(out):
                _mark(t)
            in_place = (name.endswith("_") and not name.startswith("__")) or name in IN_PLACE_OPERATORS
            if in_place and isinstance(args[0], torch.Tensor):
                _mark(args[0])
            if "out" in kwargs:
                for t in _tensors(kwargs["out"]):
                    _mark(t)
        return out


def _blocking_upload(name, args, kwargs) -> bool:
    """Host values put on the model's device other than through `transfer.upload`: a factory or `.to` that
    names the device as a torch.device (on a GPU: from pageable memory, so the stream is synchronized).
    Host-side tensors name their device as the string "cpu" (the code's convention), which is not counted."""
    if name in ("tensor", "as_tensor"):
        device = kwargs.get("device")
    elif name == "to" and kwargs.get("non_blocking") is not True:
        device = kwargs.get("device", args[1] if len(args) > 1 else None)
    else:
        return False
    return isinstance(device, torch.device) or (isinstance(device, str) and device != "cpu")


def _to_host(args, kwargs) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


@pytest.fixture
def syncs(monkeypatch):
    """The counting mode, with the decode steps counted (each call of the model's decoder) and Readback's
    copies unmarked and logged as one-step-late reads. The nucleus takes a GPU's path (a full sort) unless
    a test says otherwise: its CPU shortcut reads the mass of the 128 likeliest tokens on the host, free
    there."""
    mode = Syncs()
    real_get = transfer.Readback.get
    real_init = transfer.Readback.__init__

    def init(self, tensors):
        real_init(self, tensors)
        self.made_in_step = mode.steps

    def get(self):
        host = real_get(self)
        mode.log.append(("late", self.made_in_step, mode.steps))
        for t in host:
            if t is not None:
                setattr(t, MARK, False)
        return host

    monkeypatch.setattr(transfer.Readback, "__init__", init)
    monkeypatch.setattr(transfer.Readback, "get", get)
    monkeypatch.setattr(sampling, "_reads_are_free", lambda device: False)
    return mode


def _count_steps(monkeypatch, mode, obj, names):
    """Each call of these methods of `obj` is one step (the decoder's, for generate; the batch's)."""
    for name in names:
        real = getattr(obj, name)

        def counted(*args, _real=real, **kwargs):
            mode.steps += 1
            mode.log.append(("step", mode.steps))
            return _real(*args, **kwargs)

        monkeypatch.setattr(obj, name, counted)


def _mark_model(model) -> None:
    """The model's tensors are on the device: weights, KV cache, rotary and position tables, whatever
    module or projection holds them."""
    seen = set()

    def visit(obj, depth):
        if id(obj) in seen or depth > 4:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            _mark(obj)
            return
        if isinstance(obj, (list, tuple, dict)):
            for t in (obj.values() if isinstance(obj, dict) else obj):
                visit(t, depth + 1)
            return
        if type(obj).__module__.startswith(("llama_mp", "torch.nn")) and hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                visit(v, depth + 1)

    visit(model, 0)


@pytest.fixture(scope="module", params=["pytorch", "static"])
def built(request, make_checkpoint, tokenizer_path):
    from llama_mp import Llama

    ckpt_dir = make_checkpoint(n_kv_heads=2)[0]
    llama = Llama.build(ckpt_dir, tokenizer_path, 48, 3, seed=3, backend="gloo", device="cpu", decoder=request.param)
    _mark_model(llama.model)
    yield llama
    distributed.teardown()


K = 4  # decode steps per stop check, as a GPU decoder's


@pytest.mark.parametrize("sampled", [dict(temperature=0), dict(temperature=0.8, top_p=0.9, top_k=20),
                                     dict(temperature=0, logprobs=True, echo=True),
                                     dict(temperature=1.0, top_p=0.95, logprobs=True)])
def test_generate_reads_nothing_in_a_step_but_the_stop_check_every_k_steps(built, syncs, monkeypatch, sampled):
    llama = built
    model = llama.model
    monkeypatch.setattr(model.decoder, "steps_per_stop_check", K)
    monkeypatch.setattr(llama.engine, "stop_ids", [])  # never stops early: every step is run
    _count_steps(monkeypatch, syncs, model.decoder, ("step", "prefill"))
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in ("The quick brown fox", "Once upon")]
    streamed = []
    real_results = llama.engine._results
    monkeypatch.setattr(llama.engine, "_results", lambda *a: (setattr(syncs, "counting", False), real_results(*a))[1])
    with syncs:
        llama.generate(prompts, 10, on_token=streamed.append, **sampled)
    steps = syncs.steps
    lengths = sorted(map(len, prompts))
    assert steps == 10 + lengths[1] - lengths[0]  # the shorter prompt first, then one position per call
    reads = syncs.reads()
    assert [r[1] for r in reads] == ["__bool__"] * (steps // K), reads  # done.all(), every K steps
    assert syncs.uploads() == []
    assert [r[2] for r in reads] == [K * (i + 1) for i in range(steps // K)]
    late = [e for e in syncs.log if e[0] == "late"]
    assert len(late) == len(streamed) == steps
    # every step's tokens read once the next was queued; the last one after the loop
    assert all(read_at > made for _, made, read_at in late[:-1]) and late[-1][1:] == (steps, steps)
    assert all(not getattr(t, MARK, False) and t.device.type == "cpu" for t in streamed)


def test_the_cpu_nucleus_shortcut_is_the_only_read_of_a_sampled_cpu_step(built, syncs, monkeypatch):
    """On a CPU the nucleus first tries the 128 likeliest tokens (then 2048, then all), which needs a read
    per try (free there): one or two per step, and nothing else."""
    llama = built
    monkeypatch.setattr(sampling, "_reads_are_free", lambda device: device.type == "cpu")
    real_nucleus = sampling._nucleus

    def nucleus(*args):
        syncs.inside = "_nucleus"
        try:
            return real_nucleus(*args)
        finally:
            syncs.inside = ""

    monkeypatch.setattr(sampling, "_nucleus", nucleus)
    monkeypatch.setattr(llama.model.decoder, "steps_per_stop_check", 1000)
    monkeypatch.setattr(llama.engine, "stop_ids", [])
    _count_steps(monkeypatch, syncs, llama.model.decoder, ("step", "prefill"))
    real_results = llama.engine._results
    monkeypatch.setattr(llama.engine, "_results", lambda *a: (setattr(syncs, "counting", False), real_results(*a))[1])
    with syncs:
        llama.generate([llama.tokenizer.encode("Hello", bos=True, eos=False)], 6, temperature=0.8, top_p=0.9)
    reads = syncs.reads()
    assert {r[1:2] + r[3:] for r in reads} == {("__bool__", "_nucleus")}, reads
    per_step = [sum(r[2] == step for r in reads) for step in range(1, syncs.steps + 1)]
    assert all(1 <= n <= 2 for n in per_step), per_step


def test_the_servers_batch_loop_reads_each_step_one_step_late_and_nothing_else(built, syncs, monkeypatch):
    llama = built
    batcher = Batcher(llama.engine)
    _count_steps(monkeypatch, syncs, batcher, ("step",))
    scheduler = Scheduler(batcher, llama.tokenizer, max_queue=8, seed=5)
    prompt = llama.tokenizer.encode("Hello there", bos=True, eos=False)
    specs = [SequenceSpec(prompt, 7, 0.9, 0.95, 11, [], None, ignore_eos=True),           # sampled, nucleus
             SequenceSpec(prompt, 5, 0, 1.0, None, [], None, ignore_eos=True),            # greedy
             SequenceSpec(prompt, 3, 0, 1.0, None, [], 2, ignore_eos=True, echo=True),     # scored, logprobs
             SequenceSpec(prompt, 6, 1.0, 1.0, None, [], 1, ignore_eos=True),             # sampled, logprobs
             SequenceSpec(prompt[:2], 4, 0, 1.0, None, [], None, ignore_eos=True),        # waits for a slot
             SequenceSpec(prompt, 5, 0.8, 1.0, 3, [], None, choosing=Choosing(               # OpenAI's extras
                 top_k=20, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3, logit_bias=((5, 2.0),),
                 min_tokens=3, stop_token_ids=(7,)))]
    _, events = run_to_end(scheduler, specs, 60, around=lambda: syncs)
    finished = {e.index: e for e in events if e.finish_reason is not None}
    assert [finished[i].completion_tokens for i in range(5)] == [7, 5, 3, 6, 4] and finished[5].completion_tokens >= 3
    assert syncs.reads() == [] and syncs.uploads() == []
    late = [e for e in syncs.log if e[0] == "late"]
    assert len(late) == scheduler.steps >= 7
    # each step's tokens read while the next one is queued; only the last with nothing behind it
    assert all(read_at == made + 1 for _, made, read_at in late[:-1]) and late[-1][1] == late[-1][2]


def test_a_constrained_row_reads_only_the_copy_of_the_step_in_flight(built, syncs, monkeypatch):
    """A constrained row's mask needs the token the step in flight chose: the scheduler reads it from that
    step's copy to the host during the next step (once its forward is queued), and reads nothing else; the
    answer matches its grammar."""
    from llama_mp.runtime.grammar import schema_grammar

    llama = built
    batcher = Batcher(llama.engine)
    _count_steps(monkeypatch, syncs, batcher, ("step",))
    scheduler = Scheduler(batcher, llama.tokenizer, max_queue=8, seed=5)
    prompt = llama.tokenizer.encode("Hello there", bos=True, eos=False)
    specs = [SequenceSpec(prompt, 8, 0.9, 0.95, 11, [], None, ignore_eos=True),
             SequenceSpec(prompt, 12, 1.0, 1.0, 3, [], None, grammar=schema_grammar({"enum": ["yes", "no"]}))]
    _, events = run_to_end(scheduler, specs, 60, around=lambda: syncs)
    assert syncs.reads() == [] and syncs.uploads() == []
    assert "".join(e.text for e in events if e.index == 1) in ('"yes"', '"no"')
    late = [e for e in syncs.log if e[0] == "late"]
    assert len(late) > scheduler.steps  # the constrained row's reads of the step in flight besides each step's
    assert all(read_at == made + 1 for _, made, read_at in late[:-1]) and late[-1][1] == late[-1][2]


def test_a_gpu_decoder_checks_for_stops_every_few_steps_and_a_cpu_decoder_every_step():
    from llama_mp.runtime.decode import GPU_STOP_CHECK_STEPS, choose_decoder

    for name in ("auto", "pytorch", "static"):
        assert choose_decoder(name, torch.device("cuda"), torch.bfloat16).steps_per_stop_check == GPU_STOP_CHECK_STEPS
        assert choose_decoder(name, torch.device("cpu"), torch.float32).steps_per_stop_check == 1
    assert GPU_STOP_CHECK_STEPS > 1
