"""The `compiled` decoder (runtime/compiled.py): the static step compiled whole by torch.compile, one graph
per (rows, span) bucket made at load, the ranks' sums inside the graphs as functional collectives. On 1, 2
and 4 gloo ranks it decodes the eager static step's ids, greedy and seeded sampling, in `generate` and in
continuous batching, and compiles nothing after load. Its packed quantized products (torch's int8 and
int4 kernels, the CPU twins of the GPU's) give the dequantised reference's products and logits.

Compiling is the point of one test only (a job per rank count: 1, 2, 4), on the smallest cache that still
batches (2 rows, 16 positions: 2 graphs per rank); everything else runs without compiling."""

import pytest
import torch

from multiproc import on_ranks

PROMPTS = [[1, 306, 4658, 29871, 12], [1, 15043]]
STEPS = 6
SEQ, ROWS = 16, 2
# step -> admissions (prompt index, slot): prompt 1 starts alone in slot 1, prompt 0 joins in slot 0 a step
# later (so the rows are at different positions); prompt 1 comes back in slot 1 once that is freed.
SCHEDULE = {0: [(1, 1)], 1: [(0, 0)], STEPS + 1: [(1, 1)]}


def _batched(llama, prompts, temperature):
    """The Batcher on SCHEDULE, every row greedy or sampled with a generator of its own (seeded by its
    admission): rank 0's ids per admission; None on the other ranks (which serve)."""
    from llama_mp.runtime.batching import Admission, Batcher, Plan
    from llama_mp.runtime.sampling import RowSampling, make_generator

    batcher = Batcher(llama.engine)
    if not llama.group.is_main:
        llama.engine.serve()
        return None
    produced, slot_of, sampling = [], {}, {}
    step = 0
    while step == 0 or slot_of:
        release = [slot_of.pop(a) for a in list(slot_of) if len(produced[a]) == STEPS]
        admit = []
        for i, slot in SCHEDULE.get(step, []):
            slot_of[len(produced)] = slot
            sampling[slot] = RowSampling(temperature, 0.95, 0, make_generator("cpu", 100 + len(produced)))
            produced.append([])
            admit.append(Admission(slot, tuple(prompts[i])))
        plan = Plan(tuple(release), tuple(admit), gather=temperature > 0)
        result = batcher.run(plan, lambda slots: [sampling[s] for s in slots]).on_host()
        owner = {slot: a for a, slot in slot_of.items()}
        for slot, token in zip(result.slots, result.tokens):
            produced[owner[slot]].append(token)
        step += 1
    batcher.pause()
    llama.engine.stop()
    return produced


def static_and_compiled(ckpt_dir, tokenizer_path):
    """On every rank, for the eager static step and the compiled one: generate's greedy and seeded ids,
    the Batcher's greedy and sampled ids, and (compiled) how many graphs dynamo made after load."""
    import torch._dynamo.utils

    import workers

    results = {}
    for decoder in ("static", "compiled"):
        llama = workers.build(ckpt_dir, tokenizer_path, max_seq_len=SEQ, max_batch_size=ROWS, decoder=decoder)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        prompts = [[t % llama.model.args.vocab_size for t in p] for p in PROMPTS]
        greedy = llama.generate(prompts, STEPS, temperature=0)[0]
        llama.engine.generator.manual_seed(7)
        sampled = llama.generate(prompts, STEPS, temperature=0.9, top_p=0.95)[0]
        batched = [_batched(llama, prompts, t) for t in (0.0, 0.9)]
        after = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
        results[decoder] = (greedy, sampled, batched, after, getattr(llama.model.decoder, "graphs", 0))
    return results


@pytest.mark.spawn  # inductor starts processes of its own, even for one rank in this process
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_compiled_step_decodes_the_eager_static_steps_ids_on_any_rank_count(make_checkpoint, tokenizer_path,
                                                                           world_size):
    ckpt_dir, _, _ = make_checkpoint(shards=2, n_kv_heads=2, n_layers=1, seed=3)  # 4 ranks replicate kv heads
    per_rank = on_ranks(world_size, static_and_compiled, ckpt_dir, tokenizer_path, timeout=600)
    for rank, results in enumerate(per_rank):
        greedy, sampled, batched, after, graphs = results["compiled"]
        assert graphs == 2 and after == 0  # rows 1 and 2 at span 16, made at load; nothing compiled later
        static = results["static"]
        assert (greedy, sampled) == static[:2]
        assert greedy != sampled  # the sampled ids are not the greedy ones
        if rank == 0:
            assert batched == static[2]
            (greedy_rows, sampled_rows) = batched
            assert greedy_rows[0] == greedy[1][:STEPS] and greedy_rows[1] == greedy[0][:STEPS]  # each its own ids
            assert greedy_rows[2] == greedy_rows[0] and sampled_rows[2] != sampled_rows[0]  # own generators


def test_a_compile_failure_is_one_message_naming_the_pytorch_decoder(monkeypatch):
    from llama_mp.errors import LlamaMPError
    from llama_mp.runtime import compiled

    def fails(*args, **kwargs):
        raise torch._dynamo.exc.TorchDynamoException("CppCompileError: C++ compile error\nmany lines of output")

    def lost(*args, **kwargs):
        raise RuntimeError("Connection closed by peer")

    decoder = compiled.CompiledDecoder()
    decoder.compiled = fails
    with pytest.raises(LlamaMPError) as raised:
        decoder._run(None, torch.zeros((2, 1), dtype=torch.long), torch.zeros((2, 1), dtype=torch.long), None, 16)
    message = str(raised.value)
    assert "--decoder pytorch" in message and "2 cache row(s) and 16 positions" in message
    assert "CppCompileError" in message and "many lines" not in message
    decoder.compiled = lost  # a collective's failure inside a step is not a compile failure
    with pytest.raises(RuntimeError, match="Connection closed"):
        decoder._run(None, torch.zeros((2, 1), dtype=torch.long), torch.zeros((2, 1), dtype=torch.long), None, 16)


def test_buckets_cover_every_step():
    from llama_mp.runtime.compiled import CompiledDecoder, row_buckets, span_buckets
    from llama_mp.runtime.decode import StaticDecoder

    assert row_buckets(1) == [1] and row_buckets(6) == [1, 2, 4, 6] and row_buckets(8) == [1, 2, 4, 8]
    assert span_buckets(16) == [16] and span_buckets(40) == [16, 32, 40]

    class Model:
        max_batch_size, max_seq_len = 6, 40

    spans = {StaticDecoder().span(Model, pos) for pos in range(Model.max_seq_len)}
    assert spans == set(span_buckets(Model.max_seq_len))
    assert [CompiledDecoder().bucket(Model, rows) for rows in range(1, 7)] == [1, 2, 4, 4, 6, 6]


def test_bench_shows_the_compile_time_apart_from_load_and_speed():
    from llama_mp.tools.bench import format_report

    report = {"model": "m", "parameters": 1e6, "dtype": "float32", "weights": "unquantized", "ranks": 1,
              "device": "cpu", "threads": 1, "batch": 1, "prompt_len": 8, "new_tokens": 8, "decoding": "greedy",
              "load_s": 21.2, "compile_s": 14.4, "compiled_graphs": 2, "prefill_tok_s": 1.0, "decode_tok_s": 75.0,
              "ms_per_token": 13.3, "decode_path": "PyTorch, compiled (inductor C++)",
              "peak_memory_per_rank_gib": [0.1], "weight_bytes_per_token_per_rank": 1e6,
              "achieved_gb_s_per_rank": 1.0, "read_gb_s_per_rank": 2.0, "bandwidth_fraction": 0.5}
    text = format_report(report)
    assert "21.20 s, of which compiling and warming up 2 graphs 14.40 s" in text
    assert "75.0 tok/s (13.30 ms/token), PyTorch, compiled" in text


# ----------------------------------------------------------------------------------------------
# Packed quantized products


def _projection(kind, scheme, out_features, in_features, dtype, seed=0):
    """A packed projection of a random matrix quantized by `scheme`, loaded as a checkpoint would be, and
    the dequantised matrix it stands for."""
    from llama_mp.quant.scheme import dequantize, quantize
    from llama_mp.runtime.model import Weight

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g)
    q, scales = quantize(w, scheme)
    with torch.device("meta"):
        holders = [Weight((out_features // 2, in_features)), Weight((out_features - out_features // 2, in_features))]
    projection = kind(holders, dtype, torch.device("cpu"), scheme)
    start = 0
    for h in holders:  # what loading does: copy each holder's slice into place
        rows = h.weight.shape[0]
        h.weight.copy_(q[start:start + rows])
        h.scales.copy_(scales[start:start + rows])
        start += rows
    projection.pack()
    return projection, dequantize(q, scales, scheme)


@pytest.mark.parametrize("mode,group_size", [("int8", 0), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_products_equal_the_dequantised_reference(mode, group_size, dtype):
    from llama_mp.quant.scheme import Scheme
    from llama_mp.runtime.compiled import PackedInt4Projection, PackedInt8Projection

    scheme = Scheme(mode, group_size)
    kind = PackedInt8Projection if mode == "int8" else PackedInt4Projection
    projection, reference = _projection(kind, scheme, 96, 256, dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # bfloat16: its own rounding of x and of y
    matrix = projection.matrix()  # read back through the kernel (int4) or dequantised (int8)
    assert (matrix.double() - reference.double()).abs().max() <= tolerance * reference.abs().max()
    x = torch.randn(3, 2, 256, generator=torch.Generator().manual_seed(1))
    for rows in (x[:1, :1], x):  # one row (decoding) and several (a prompt)
        y = projection(rows.to(dtype))
        expected = rows.double() @ reference.double().T
        assert y.dtype == dtype and y.shape == (*rows.shape[:-1], 96)
        scale = expected.abs().max()
        assert (y.double() - expected).abs().max() <= tolerance * scale


def _packed_bytes(model):
    """Bytes the packed projections hold besides the loaded integers and scales they keep."""
    from llama_mp.runtime.compiled import PackedInt4Projection, PackedInt8Projection, _projections

    total = 0
    for p in _projections(model):
        if isinstance(p, PackedInt8Projection):
            total += p.packed_scales.numel() * p.packed_scales.element_size()
        elif isinstance(p, PackedInt4Projection):
            total += p.scale_and_zero.numel() * p.scale_and_zero.element_size()
            if p.scales.data_ptr() == p.scale_and_zero.data_ptr():  # the loaded scales were dropped
                total -= p.scales.numel() * 2
    return total


@pytest.mark.parametrize("quantize,dtype", [("int8", "float32"), ("int4", "float32"), ("int4", "bfloat16")])
def test_packed_model_logits_match_the_dequantising_decoder(make_checkpoint, tokenizer_path, quantize, dtype):
    """Whole models: the compiled decoder's packed projections (run eagerly here: a prompt's prefill,
    which no graph runs) against the portable dequantising path on the same quantized weights; and the
    memory estimate (`plan`, the load's check) counts what packing adds."""
    from llama_mp import Llama
    from llama_mp.runtime.compiled import CompiledDecoder, PackedInt4Projection, PackedInt8Projection
    from llama_mp.runtime.footprint import estimate

    class PackOnly(CompiledDecoder):
        def start(self, model):  # pack as at load, without compiling
            self.pack(model)

    ckpt_dir, args, _ = make_checkpoint(seed=2)
    # Llama 2 ids, within the vocabulary of whichever tokenizer the tests have (a tiny one without ../shared)
    prompt = torch.tensor([[t % args.vocab_size for t in (1, 306, 4658, 29871, 12, 450, 4996, 17354)]])
    logits = []
    for decoder in ("pytorch", PackOnly()):
        llama = Llama.build(ckpt_dir, tokenizer_path, 16, 1, dtype=dtype, decoder=decoder, backend="gloo",
                            device="cpu", quantize=quantize)
        with torch.inference_mode():
            logits.append(llama.model(prompt, 0, all_positions=True)[0].float())
    model = llama.model
    kind = PackedInt8Projection if quantize == "int8" else PackedInt4Projection
    assert isinstance(model.layers[0].feed_forward.down, kind)
    exact = dtype == "float32"
    tolerance = (1e-4 if exact else 3e-2) * float(logits[0].abs().max())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4 if exact else 3e-2, atol=tolerance)
    if exact:
        assert torch.equal(logits[1].argmax(-1), logits[0].argmax(-1))
    added = (estimate(model.args, 1, dtype, 1, 16, packed=True).weights
             - estimate(model.args, 1, dtype, 1, 16).weights)
    assert added == _packed_bytes(model) > 0


def test_what_the_gpus_int4_kernel_cannot_take_is_refused_at_load_with_what_to_do():
    from llama_mp.errors import LlamaMPError
    from llama_mp.quant.scheme import Scheme
    from llama_mp.runtime.compiled import CompiledDecoder, int4_pack_problem
    from llama_mp.runtime.decode import choose_decoder

    cuda = torch.device("cuda")  # only decided here, nothing allocated
    with pytest.raises(LlamaMPError, match="bfloat16 activations, not float16; use --dtype bfloat16, or --decoder pytorch"):
        choose_decoder("compiled", cuda, torch.float16, Scheme("int4", 32))
    assert isinstance(choose_decoder("compiled", cuda, torch.bfloat16, Scheme("int4", 32)), CompiledDecoder)
    assert "multiple of 8 outputs" in int4_pack_problem(64, 12, cuda, torch.bfloat16)
    assert int4_pack_problem(64, 16, cuda, torch.bfloat16) is None and int4_pack_problem(64, 12, torch.device("cpu"),
                                                                                          torch.float32) is None


def test_plan_counts_the_packed_products_of_the_compiled_decoder():
    from llama_mp.checkpoints.params import load_preset
    from llama_mp.errors import LlamaMPError
    from llama_mp.tools.plan import make_plan

    args = load_preset("llama-3.1-8b")[0]
    plans = {d: make_plan(args, "8b", 1, 80, "bfloat16", 2048, 1, "int4", 32, d)["per_rank"] for d in ("auto", "compiled")}
    # no dequantised matrix at run time (the repacking's transient at load is less), one more bfloat16 per group
    assert plans["compiled"]["activations"] < plans["auto"]["activations"]
    groups = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096) // 32
    assert plans["compiled"]["weights"] - plans["auto"]["weights"] == 2 * groups + 2 * 128256
    with pytest.raises(LlamaMPError, match="Unknown --decoder 'fast'"):
        make_plan(args, "8b", 1, 80, decoder="fast")
