"""The model-parallel model computes the same function on 1, 2 and 4 ranks, and the same function as an
independent reference implementation and as Hugging Face transformers on the same weights, with every
decoder that ships: PyTorch and its static-shape step, each also as a GPU gets them (float matrices [out, in]
for F.linear: "gpu:NAME", run here on the CPU), and the CPU kernels; the GPU's bfloat16 and float16 runs
are the float32 reference to within their rounding."""

import numpy as np
import pytest
import torch

from llama_mp.kernels import cpu
from multiproc import on_ranks, run_ranks
from reference import reference_greedy, reference_logits
from workers import (build, greedy_after_the_callers_own_setup, greedy_ids, logits_and_greedy,
                     logits_and_greedy_with_each, prefill_and_step_logits, sampled)

STEPS = 12
MHA = dict()                           # 4 heads, each with its own keys/values
GQA = dict(n_heads=8, n_kv_heads=4)    # grouped-query attention, 2 query heads per kv head
GPU_DECODERS = ["gpu:pytorch", "gpu:static"]  # what `choose_decoder` gives a GPU (see workers.decoder_of)
RUNNABLE = ["pytorch", "static", *GPU_DECODERS] + (["cpu_kernels"] if cpu.library() is not None else [])
DECODERS = ["pytorch", "static", *GPU_DECODERS, pytest.param("cpu_kernels", marks=pytest.mark.skipif(
    cpu.library() is None, reason="the CPU kernels can't be built here"))]


@pytest.fixture(scope="module", params=DECODERS)
def decoder(request):
    return request.param


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = ["The capital of France is", "Once upon a time", "Model parallel inference splits every layer"]
    return [tokenizer.encode(t, bos=True, eos=False) for t in texts]


@pytest.fixture(scope="module")
def one_rank(make_checkpoint, tokenizer_path, prompts, decoder):
    """Logits and greedy ids of MHA and GQA models from a single-shard checkpoint, in one process."""
    cases = [make_checkpoint(shards=1, **MHA)[0], make_checkpoint(shards=1, **GQA)[0]]
    return logits_and_greedy(cases, tokenizer_path, prompts, STEPS, decoder)


@pytest.fixture(scope="module")
def on_ranks_with_each_decoder(make_checkpoint, tokenizer_path, prompts):
    """on_ranks_with_each_decoder(world_size) -> {decoder: each rank's `logits_and_greedy`}, from one job
    per rank count that runs every decoder (a job per decoder would start the ranks again)."""
    decoders = RUNNABLE
    jobs = {}

    def results(world_size):
        if world_size not in jobs:
            cases = [make_checkpoint(shards=world_size, **MHA)[0], make_checkpoint(shards=world_size, **GQA)[0]]
            per_rank = run_ranks(world_size, logits_and_greedy_with_each, cases, tokenizer_path, prompts, STEPS,
                                 decoders)
            jobs[world_size] = {d: [rank[i] for rank in per_rank] for i, d in enumerate(decoders)}
        return jobs[world_size]

    return results


@pytest.mark.spawn
@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_compute_the_same_logits_and_greedy_ids_as_one_rank(world_size, decoder, one_rank,
                                                                 on_ranks_with_each_decoder):
    per_rank = on_ranks_with_each_decoder(world_size)[decoder]
    for (ref_logits, ref_ids), *ranks in zip(one_rank, *per_rank):
        logits = ranks[0][0]
        np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=2e-5)  # gathered on rank 0
        assert [ids for _, ids in ranks] == [ref_ids] * world_size  # every rank returns the same ids


@pytest.fixture(scope="module")
def independent(make_checkpoint, prompts):
    """The independent reference's logits of the first prompt and greedy ids of every prompt, for the MHA
    and GQA models: computed once, the same expectation for every decoder."""
    expected = []
    for cfg in (MHA, GQA):
        _, args, state = make_checkpoint(shards=1, **cfg)
        expected.append((reference_logits(state, args, prompts[0]).numpy(),
                         [reference_greedy(state, args, p, STEPS) for p in prompts]))
    return expected


def test_model_matches_independent_reference(one_rank, independent):
    for (logits, ids), (expected_logits, expected_ids) in zip(one_rank, independent):
        np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-4)
        assert ids == expected_ids


def test_bfloat16_checkpoint_loads_in_float32_and_bfloat16(make_checkpoint, tokenizer_path, prompts):
    ckpt_dir, args, state = make_checkpoint(shards=2, dtype=torch.bfloat16, **GQA)
    expected = reference_logits(state, args, prompts[0])  # reference upcasts the bf16 weights
    as_f32 = build(ckpt_dir, tokenizer_path, dtype="float32", decoder="pytorch")
    as_bf16 = build(ckpt_dir, tokenizer_path, dtype="bfloat16", decoder="pytorch")  # the kernels: test_cpu_kernels
    assert as_f32.model.output.weight.dtype == torch.float32
    assert as_bf16.model.output.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        f32 = as_f32.model(torch.tensor([prompts[0]]), 0, all_positions=True)[0]
        bf16 = as_bf16.model(torch.tensor([prompts[0]]), 0, all_positions=True)[0]
    torch.testing.assert_close(f32, expected, rtol=0, atol=1e-4)
    assert close_in_bulk(bf16.numpy(), expected.numpy(), torch.bfloat16)


def test_the_gpu_decoders_store_matrices_as_the_checkpoint_does(make_checkpoint, tokenizer_path):
    """What makes "gpu:NAME" the GPU's configuration on a CPU: F.linear over [out, in] float matrices."""
    from llama_mp.runtime.projection import InOutProjection, Projection

    ckpt_dir, args, _ = make_checkpoint(**GQA)
    for name, kind in (("pytorch", InOutProjection), ("static", InOutProjection), *((d, Projection) for d in GPU_DECODERS)):
        qkv = build(ckpt_dir, tokenizer_path, decoder=name).model.layers[0].attention.qkv
        assert type(qkv) is kind, name
        assert qkv.storage.shape == ((qkv.out_features, args.dim) if kind is Projection else (args.dim, qkv.out_features))


def close_in_bulk(got, expected, dtype) -> bool:
    """Logits computed in `dtype` (bfloat16 keeps ~3 significant digits, float16 ~4) against float32's: close
    in bulk, not bit-equal. Measured on these models: a mean error of ~1.1 of the dtype's eps, relative."""
    return bool(np.abs(got - expected).mean() < 4 * torch.finfo(dtype).eps * np.abs(expected).mean())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.spawn),
                                        pytest.param(4, marks=pytest.mark.spawn)])
def test_the_gpu_decoders_in_half_precision_compute_the_float32_reference(make_checkpoint, tokenizer_path, prompts,
                                                                          world_size, dtype):
    """A float32 checkpoint loaded in bfloat16 or float16 by the decoders a GPU gets: the logits of a prefill
    and of decode steps after it are the float32 reference's, to within that dtype's rounding."""
    ckpt_dir, args, state = make_checkpoint(shards=world_size, **GQA)
    expected = reference_logits(state, args, prompts[2]).numpy()
    per_rank = on_ranks(world_size, prefill_and_step_logits, ckpt_dir, tokenizer_path, prompts[2], GPU_DECODERS,
                        dtype)
    assert all(logits is None for rank in per_rank[1:] for logits in rank)  # gathered on rank 0 only
    for name, logits in zip(GPU_DECODERS, per_rank[0]):
        assert logits.shape == expected.shape
        assert close_in_bulk(logits, expected, getattr(torch, dtype)), name
        assert not np.array_equal(logits, expected)  # really computed in the lower precision


@pytest.mark.spawn
def test_sampling_with_a_seed_gives_the_same_text_on_any_rank_count_and_decoder(make_checkpoint, tokenizer_path,
                                                                                prompts):
    one = sampled(make_checkpoint(shards=1)[0], tokenizer_path, prompts, STEPS, 7, "pytorch")
    two = run_ranks(2, sampled, make_checkpoint(shards=2)[0], tokenizer_path, prompts, STEPS, 7)
    assert two[0] == two[1] == one
    if cpu.library() is not None:
        assert sampled(make_checkpoint(shards=1)[0], tokenizer_path, prompts, STEPS, 7, "cpu_kernels") == one
    other_seed = sampled(make_checkpoint(shards=1)[0], tokenizer_path, prompts, STEPS, 8)
    assert other_seed != one


@pytest.mark.spawn
def test_a_caller_that_set_up_torch_distributed_and_fairscale_itself_gets_the_same_tokens(make_checkpoint,
                                                                                          tokenizer_path):
    """Meta's scripts start the process group and fairscale's model-parallel group before building: the
    ranks must still sum each other's partial results, not compute alone and disagree."""
    one = greedy_ids([make_checkpoint(shards=1)[0]], tokenizer_path)
    assert run_ranks(2, greedy_after_the_callers_own_setup, make_checkpoint(shards=2)[0], tokenizer_path) == [one] * 2


def _to_transformers(state, args):
    """The same weights as a transformers LlamaForCausalLM, written here independently of llama_mp.

    Meta rotates interleaved pairs (x0, x1), (x2, x3), ...; transformers rotates the two halves of each
    head. Reordering the rows of wq and wk within each head maps one convention to the other."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_kv = args.n_kv_heads or args.n_heads
    hd = args.dim // args.n_heads

    def permute(w, heads):
        return w.view(heads, hd // 2, 2, args.dim).transpose(1, 2).reshape(heads * hd, args.dim)

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                         num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads, num_key_value_heads=n_kv,
                         rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, max_position_embeddings=256,
                         tie_word_embeddings=False, torch_dtype="float32")
    hf = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
          "lm_head.weight": state["output.weight"]}
    for i in range(args.n_layers):
        m, p = f"model.layers.{i}.", f"layers.{i}."
        hf.update({
            m + "self_attn.q_proj.weight": permute(state[p + "attention.wq.weight"], args.n_heads),
            m + "self_attn.k_proj.weight": permute(state[p + "attention.wk.weight"], n_kv),
            m + "self_attn.v_proj.weight": state[p + "attention.wv.weight"],
            m + "self_attn.o_proj.weight": state[p + "attention.wo.weight"],
            m + "mlp.gate_proj.weight": state[p + "feed_forward.w1.weight"],
            m + "mlp.down_proj.weight": state[p + "feed_forward.w2.weight"],
            m + "mlp.up_proj.weight": state[p + "feed_forward.w3.weight"],
            m + "input_layernorm.weight": state[p + "attention_norm.weight"],
            m + "post_attention_layernorm.weight": state[p + "ffn_norm.weight"],
        })
    model = LlamaForCausalLM(config).float().eval()
    model.load_state_dict({k: v.float() for k, v in hf.items()}, strict=True)
    return model


def test_transformers_gives_the_same_greedy_ids(make_checkpoint, prompts, one_rank):
    pytest.importorskip("transformers")
    for (logits, ids), cfg in zip(one_rank, (MHA, GQA)):
        _, args, state = make_checkpoint(shards=1, **cfg)
        hf = _to_transformers(state, args)
        with torch.inference_mode():
            hf_logits = hf(torch.tensor([prompts[0]])).logits[0]
            np.testing.assert_allclose(logits, hf_logits.numpy(), rtol=0, atol=1e-4)
            for prompt, ours in zip(prompts, ids):
                seq = list(prompt)
                for _ in range(STEPS):
                    seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
                assert seq[len(prompt):] == ours
