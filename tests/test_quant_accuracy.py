"""How much quantization changes what a model says, measured as the issue asks: teacher-forced
log-probabilities over a text, quantized vs full precision on the same weights (mean |Δ logprob| and
how often the most likely token agrees), through `llama-mp perplexity --per_token/--compare`.

Random weights give flat distributions that hide quantization error, so the model here is trained at
test time for a couple of seconds on repetitive text (tests/training.py): its distributions are peaked
like a real model's. On it, int8's greedy choices agree with the full model's, and int4's scale search
is no worse than plain round-to-nearest in groups of 32 on the same weights."""

import os
import shutil

import pytest
import torch

from llama_mp.checkpoints import meta as checkpoint
from llama_mp.checkpoints.params import ModelArgs
from llama_mp.checkpoints.quantize import quantize_checkpoint
from llama_mp.checkpoints.reshard import save_consolidated
from llama_mp.quant.scheme import pack_int4
from llama_mp.runtime.tokenizer import Tokenizer
from llama_mp.tools.perplexity import Scores, agreement
from training import train, training_text
from workers import build, perplexity_report

pytestmark = pytest.mark.slow  # trains a model first (tests/training.py)

WINDOW, STRIDE = 64, 32


def round_to_nearest_int4(w: torch.Tensor, group: int = 32):
    """Plain round-to-nearest: scale max|group| / 7 (as stored, bfloat16), no search."""
    groups = w.float().view(w.shape[0], -1, group)
    scale = (groups.abs().amax(dim=-1) / 7).to(torch.bfloat16)
    q = torch.round(groups / torch.where(scale > 0, scale.float(), 1.0)[..., None]).clamp(-8, 7)
    return pack_int4(q.to(torch.int8).view(w.shape)), scale


def write_rtn_copy(int4_dir: str, state, dst: str) -> str:
    """The int4 folder with every layer linear replaced by plain round-to-nearest of the same weights."""
    shutil.copytree(int4_dir, dst)
    path = os.path.join(dst, "consolidated.00.pth")
    shard = torch.load(path)
    for key in [k for k in shard if k.endswith(".scales") and k.startswith("layers.")]:
        weight = key[:-len(".scales")] + ".weight"
        shard[weight], shard[key] = round_to_nearest_int4(state[weight])
    torch.save(shard, path)
    checkpoint.write_checklist(dst, progress=False)
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
    """{name: Scores} for the trained model in full precision, int8, int4 and int4 round-to-nearest, and
    for a random model in full precision, int4 and int4 round-to-nearest; plus the trained full folder."""
    tok = Tokenizer(tokenizer_path)
    text = training_text()
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, vocab_size=tok.n_words)
    trained, loss = train(args, tok.encode(text, bos=True, eos=False))
    assert loss < 0.5, "the model should have learnt the text"
    root = tmp_path_factory.mktemp("accuracy")
    # The random model reads varied text (random pieces): on few distinct contexts its small differences
    # would be noise.
    pieces = torch.randint(min(300, tok.n_words // 4), tok.n_words, (700,),
                           generator=torch.Generator().manual_seed(0)).tolist()
    texts = {"trained": text, "random": tok.decode(pieces)}
    scores = {}
    for name, state, seed in (("trained", trained, None), ("random", None, 3)):
        text_path = str(root / f"{name}.txt")
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(texts[name])
        full = str(root / name)
        if state is None:
            from llama_mp.checkpoints.synth import write_random_checkpoint
            state = write_random_checkpoint(full, args, 1, seed=seed)
        else:
            save_consolidated(full, args, state, 1)
        folders = {"full": full}
        for mode in ("int8", "int4"):
            folders[mode] = str(root / f"{name}-{mode}")
            quantize_checkpoint(full, folders[mode], mode, progress=False)
        folders["rtn4"] = write_rtn_copy(folders["int4"], state, str(root / f"{name}-rtn4"))
        for kind, folder in folders.items():
            per_token = str(root / f"{name}-{kind}.json")
            perplexity_report(folder, tokenizer_path, text_path, WINDOW, STRIDE, per_token=per_token)
            scores[f"{name}-{kind}"] = Scores.load(per_token)
    scores["folders"] = {"trained": str(root / "trained"), "trained-int8": str(root / "trained-int8")}
    print_table(scores)  # the README's figures: `pytest tests/test_quant_accuracy.py -s`
    return scores


def print_table(scores) -> None:
    print("\nmodel    weights  perplexity  mean|dlogprob|  greedy agreement")
    for model in ("trained", "random"):
        for kind in ("full", "int8", "int4", "rtn4"):
            run = scores[f"{model}-{kind}"]
            close = agreement(run, scores[f"{model}-full"])
            print(f"{model:8} {kind:8} {run.perplexity:10.4f}  {close['mean_abs_delta_logprob']:14.5f}  "
                  f"{100 * close['greedy_agreement']:15.2f}%")


def test_the_trained_model_is_sure_of_itself_unlike_a_random_one(runs):
    assert runs["trained-full"].perplexity < 2.0 < 1000 < runs["random-full"].perplexity


def test_int8_agrees_with_the_full_model_on_the_trained_model(runs, tokenizer_path):
    close = agreement(runs["trained-int8"], runs["trained-full"])
    assert close["greedy_agreement"] >= 0.98 and close["mean_abs_delta_logprob"] < 0.02, close
    prompt = ["the cat sat on"]
    full = build(runs["folders"]["trained"], tokenizer_path).text_completion(prompt, max_gen_len=16, temperature=0)
    int8 = build(runs["folders"]["trained-int8"], tokenizer_path).text_completion(prompt, max_gen_len=16,
                                                                                 temperature=0)
    assert int8[0]["generation"] == full[0]["generation"]


@pytest.mark.parametrize("model", ["trained", "random"])
def test_int4_is_no_worse_than_round_to_nearest_and_int8_is_closer_still(runs, model):
    ours = agreement(runs[f"{model}-int4"], runs[f"{model}-full"])
    plain = agreement(runs[f"{model}-rtn4"], runs[f"{model}-full"])
    int8 = agreement(runs[f"{model}-int8"], runs[f"{model}-full"])
    # The scale search minimises each group's weight error, so that is never worse than plain rounding
    # (test_quantize checks it per tensor); what it does to one small model's log-probabilities on one
    # text also carries the luck of that model, so here "no worse" allows 10% of noise.
    assert ours["mean_abs_delta_logprob"] <= 1.1 * plain["mean_abs_delta_logprob"], (ours, plain)
    assert int8["mean_abs_delta_logprob"] < ours["mean_abs_delta_logprob"], (int8, ours)
