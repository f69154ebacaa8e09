"""Generation on a GPU against the CPU, one rank in this process: float32 greedy ids and logits equal the
CPU's (Llama 2 and Llama 3 shapes), bfloat16 and float16 stay within what their rounding allows, seeded
sampling repeats and draws the distribution it should, int8/int4 quantized while loading compute the
model their dequantised weights describe, and perplexity matches."""

import json

import pytest
import torch

from gpu_common import BACKEND, DEVICE, all_logits, built, prompt_ids
from llama_mp.checkpoints import layout
from llama_mp.quant.scheme import dequantize
from llama_mp.runtime.sampling import make_generator, sample
from reference import reference_greedy

pytestmark = pytest.mark.gpu

STEPS = 12
LLAMA31 = dict(n_heads=8, n_kv_heads=4, use_scaled_rope=True, rope_theta=500000.0)  # as tests/test_llama3.py


@pytest.fixture(scope="module")
def families(make_checkpoint, tokenizer_path, llama3_tokenizer_path):
    """{family: (ckpt_dir, tokenizer_path)}: tiny random Llama 2 (GQA) and Llama 3.1 (scaled rope) checkpoints."""
    from llama_mp.runtime.tokenizer import Tokenizer

    vocab3 = Tokenizer(llama3_tokenizer_path).n_words
    return {"llama2": (make_checkpoint(n_kv_heads=2)[0], tokenizer_path),
            "llama3": (make_checkpoint(vocab_size=vocab3, **LLAMA31)[0], llama3_tokenizer_path)}


@pytest.fixture(scope="module")
def cpu_float32(families):
    """{family: (prompts, greedy ids, teacher-forced logits along prompt 0 and its continuation)} on the CPU."""
    out = {}
    for family, (ckpt_dir, tok) in families.items():
        with built(ckpt_dir, tok, on_gpu=False, decoder="pytorch") as llama:
            prompts = prompt_ids(llama)
            ids, _ = llama.generate(prompts, STEPS, temperature=0)
            out[family] = (prompts, ids, all_logits(llama, prompts[0] + ids[0]))
    return out


# The compiled decoder on the GPU itself only: on the CPU lane it would compile for minutes (tests/test_compiled.py
# is its CPU check).
COMPILED = pytest.param("llama2", "compiled", marks=pytest.mark.skipif(DEVICE != "cuda", reason="compiles on CUDA"))


@pytest.mark.parametrize("family,decoder", [("llama2", "auto"), ("llama3", "auto"), ("llama2", "static"), COMPILED])
def test_float32_greedy_ids_and_logits_equal_the_cpus(families, cpu_float32, family, decoder):
    prompts, cpu_ids, cpu_logits = cpu_float32[family]
    with built(*families[family], on_gpu=True, decoder=decoder) as llama:
        assert llama.group.device.type == DEVICE and llama.group.backend == BACKEND
        ids, _ = llama.generate(prompts, STEPS, temperature=0)
        logits = all_logits(llama, prompts[0] + cpu_ids[0])
    assert ids == cpu_ids
    # float32 both sides; only the order of the sums differs (TF32 is off by default in torch)
    torch.testing.assert_close(logits, cpu_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_within_its_rounding_of_the_float32_model(families, cpu_float32, dtype):
    """Tolerance, measured rather than guessed: the CPU running the same model in the same dtype shows how
    far that dtype's rounding takes the logits from float32 (err_cpu). The GPU rounds the same operations
    to the same precision in another order, so its logits may be as far off, not an order of magnitude
    more: within 3 x err_cpu + 0.02. Greedy ids may then part from float32's only at near-ties: every
    token the GPU picks is one the float32 model rates within that tolerance of its best."""
    if dtype == "bfloat16" and DEVICE == "cuda" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    prompts, cpu_ids, ref = cpu_float32["llama2"]
    tokens = prompts[0] + cpu_ids[0]  # the float32 model's own sequence, teacher-forced
    ckpt_dir, tok = families["llama2"]
    with built(ckpt_dir, tok, on_gpu=False, dtype=dtype, decoder="pytorch") as llama:
        err_cpu = float((all_logits(llama, tokens) - ref).abs().max())
    with built(ckpt_dir, tok, on_gpu=True, dtype=dtype) as llama:
        gpu = all_logits(llama, tokens)
        ids, _ = llama.generate(prompts, STEPS, temperature=0)
    tolerance = 3 * err_cpu + 0.02
    assert torch.isfinite(gpu).all()
    assert float((gpu - ref).abs().max()) <= tolerance, (float((gpu - ref).abs().max()), err_cpu)
    with built(ckpt_dir, tok, on_gpu=False, decoder="pytorch") as llama:  # float32 along the GPU's own choices
        for prompt, chosen in zip(prompts, ids):
            f32 = all_logits(llama, prompt + chosen)[len(prompt) - 1:len(prompt) - 1 + len(chosen)]
            picked = f32.gather(1, torch.tensor(chosen)[:, None])[:, 0]
            assert (picked >= f32.max(dim=1).values - tolerance).all(), (prompt, chosen)


def test_seeded_sampling_repeats_on_the_gpu(families):
    with built(*families["llama2"], on_gpu=True) as llama:
        assert llama.engine.generator.device.type == DEVICE
        prompts = prompt_ids(llama)
        runs = []
        for seed in (5, 5, 6):
            llama.engine.generator.manual_seed(seed)
            runs.append(llama.generate(prompts, STEPS, temperature=1.0, top_p=0.95)[0])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # 3 prompts x 12 draws from a near-uniform tiny model: never all alike


def test_sampling_on_the_gpu_draws_the_distribution_it_should():
    """20000 draws from 6 known probabilities, with the GPU's generator: a chi-square test (5 degrees of
    freedom; 40 is exceeded with probability below 1e-6 by a correct sampler, and the seed is fixed).
    top_k and top_p keep only their tokens, in the renormalised proportions."""
    device = torch.device(DEVICE)
    probs = torch.tensor([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
    logits = probs.log().to(device).expand(20000, -1).contiguous()

    def counts(top_p, top_k, seed):
        ids = sample(logits, 1.0, top_p, top_k, make_generator(device, seed))
        assert ids.device == device
        return torch.bincount(ids.cpu(), minlength=6).double()

    def chi2(observed, expected_probs):
        keep = expected_probs > 0
        expected = expected_probs[keep] * observed.sum()
        assert observed[~keep].sum() == 0, observed  # nothing drawn outside the kept tokens
        return float(((observed[keep] - expected) ** 2 / expected).sum())

    full = probs.double()
    assert chi2(counts(1.0, 0, 1), full) < 40
    top2 = torch.tensor([0.35, 0.25, 0, 0, 0, 0], dtype=torch.float64)
    assert chi2(counts(1.0, 2, 2), top2 / top2.sum()) < 40
    nucleus = torch.tensor([0.35, 0.25, 0.2, 0, 0, 0], dtype=torch.float64)  # 0.35 + 0.25 < 0.7 <= 0.8
    assert chi2(counts(0.7, 0, 3), nucleus / nucleus.sum()) < 40


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32)])
def test_quantized_while_loading_equals_its_dequantised_float32_model(make_checkpoint, tokenizer_path, mode,
                                                                       group_size, monkeypatch):
    """The GPU's quantized model computes the model its quantized weights describe: greedy ids equal the
    independent float32 reference (tests/reference.py) run on the dequantised weights. (In the CPU dry
    run the C kernels compute it; with float inputs, as the reference has them.)"""
    from llama_mp.kernels import cpu as cpu_kernels

    monkeypatch.setenv(cpu_kernels.ACTIVATIONS_ENV, "float")
    ckpt_dir = make_checkpoint(dim=128, multiple_of=128, n_kv_heads=2)[0]
    with built(ckpt_dir, tokenizer_path, on_gpu=True, quantize=mode, group_size=group_size) as llama:
        prompts = prompt_ids(llama)
        ids, _ = llama.generate(prompts, 8, temperature=0)
        args = llama.model.args
        state = {k: v.cpu() for k, v in llama.model.state_dict().items()}
    whole = {}
    for key, t in state.items():
        if key.endswith(".scales"):
            continue
        scheme = layout.scheme_of(key, args)
        whole[key] = t.float() if scheme is None else dequantize(t, state[key[:-len(".weight")] + ".scales"], scheme)
    assert any(layout.scheme_of(k, args) is not None for k in state), "nothing was quantized"
    assert ids == [reference_greedy(whole, args, p, 8) for p in prompts]


def test_perplexity_equals_the_cpus(families, llama_mp_command, tmp_path):
    ckpt_dir, tok = families["llama2"]
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    results = []
    for flags in (["--device", DEVICE, "--backend", BACKEND], ["--device", "cpu", "--backend", "gloo"]):
        code, out, err = llama_mp_command("perplexity", ckpt_dir, tok, text, "--max_seq_len", 48, "--dtype",
                                          "float32", "--json", *flags)
        assert code == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    gpu, cpu = results
    assert gpu["perplexity"] == pytest.approx(cpu["perplexity"], rel=1e-4), (gpu, cpu)
