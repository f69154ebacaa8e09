"""Llama 4 through the commands a user runs (issue 23: everything else of ours works for it): `llama-mp synth
--family llama4` as docs/llama4.md shows it, `verify`, torchrun's text and chat launchers on 2 ranks, and
`perplexity`, each compared with transformers' Llama4ForCausalLM on the same weights (tests/llama4_helpers.py's
own mapping)."""

import json
import math
import os

import pytest
import torch

from llama4_helpers import hf_logits_and_greedy, hf_model, until_stop
from llama_mp.checkpoints import layout, meta as checkpoint
from llama_mp.checkpoints.params import load_params
from llama_mp.runtime.chat import encode_dialog
from llama_mp.runtime.tokenizer import Tokenizer
from llama_mp.tools.perplexity import windows
from test_launch import json_lines, launch

pytest.importorskip("transformers")
pytestmark = pytest.mark.spawn  # torchrun jobs

STEPS = 8
PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived a fox that"]


@pytest.fixture(scope="module")
def demo4(tmp_path_factory):
    """docs/llama4.md's `llama-mp synth demo4 --family llama4 --mp 2 --dim 64 --n_heads 4 --n_layers 4`: MoE and
    dense layers, NoPE, chunks of 16, qk norm; with its tokenizer, whole tensors and transformers' model."""
    from llama_mp.cli.commands import synth

    ckpt = str(tmp_path_factory.mktemp("demo4") / "demo4")
    synth(ckpt, mp=2, dim=64, n_heads=4, n_layers=4, family="llama4")
    tok = Tokenizer(os.path.join(ckpt, "tokenizer.model"), "llama4")
    args = load_params(ckpt).with_vocab(tok.n_words)
    shards = [torch.load(p, weights_only=True) for p in checkpoint.shard_paths(ckpt)]
    state = {k: layout.merge(k, [s[k] for s in shards], args) for k in shards[0]}
    return {"ckpt": ckpt, "tok": tok, "args": args, "model": hf_model(args, state),
            "cli": ["--ckpt_dir", ckpt, "--tokenizer_path", os.path.join(ckpt, "tokenizer.model")]}


def hf_greedy(demo4, ids):
    return until_stop(hf_logits_and_greedy(demo4["model"], ids, STEPS)[1], demo4["tok"].stop_ids)


def test_synth_writes_what_verify_accepts(demo4, llama_mp_command):
    assert demo4["args"].family == "llama4" and demo4["args"].llama4.num_experts == 4
    assert len(checkpoint.shard_paths(demo4["ckpt"])) == 2
    code, out, err = llama_mp_command("verify", demo4["ckpt"], "--quiet")
    assert code == 0, out + err


def test_text_completion_on_two_ranks_gives_transformers_greedy_ids(demo4):
    out = json_lines(launch("text_completion.py", *demo4["cli"], "--prompts", json.dumps(PROMPTS), "--temperature",
                            "0", "--max_gen_len", str(STEPS), "--json", ranks=2))
    expected = [hf_greedy(demo4, demo4["tok"].encode(p, bos=True, eos=False)) for p in PROMPTS]
    assert [r["token_ids"] for r in out] == expected and all(len(ids) > 1 for ids in expected)


def test_chat_completion_on_two_ranks_gives_transformers_greedy_ids_of_the_dialogs_prompt(demo4, tmp_path):
    dialogs = [[{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello?"}]]
    path = tmp_path / "dialogs.json"
    path.write_text(json.dumps(dialogs))
    out = json_lines(launch("chat_completion.py", *demo4["cli"], "--dialogs", str(path), "--max_gen_len", str(STEPS),
                            "--temperature", "0", "--json", ranks=2))
    expected = [hf_greedy(demo4, encode_dialog(demo4["tok"], d)) for d in dialogs]
    assert [r["token_ids"] for r in out] == expected and len(expected[0]) > 1


def test_perplexity_equals_transformers_scores_of_the_same_windows(demo4, tmp_path, llama_mp_command):
    text = "The quick brown fox jumps over the lazy dog. " * 6 + "Mixture of experts, chunked attention."
    path = tmp_path / "text.txt"
    path.write_text(text, encoding="utf-8")
    code, out, err = llama_mp_command("perplexity", *demo4["cli"], "--text", path, "--max_seq_len", 32, "--device",
                                      "cpu", "--backend", "gloo", "--dtype", "float32", "--json")
    assert code == 0, err
    report = json.loads(out)
    tokens = demo4["tok"].encode(text, bos=True, eos=False)
    logprobs = []
    with torch.no_grad():
        for begin, end, first in windows(len(tokens), 32, 16):
            lp = torch.log_softmax(demo4["model"](torch.tensor([tokens[begin:end]])).logits[0, :-1].double(), dim=-1)
            logprobs.append(lp.gather(-1, torch.tensor(tokens[begin + 1:end])[:, None])[first - begin - 1:, 0])
    expected = math.exp(-torch.cat(logprobs).mean().item())
    assert report["scored"] == len(tokens) - 1
    assert report["perplexity"] == pytest.approx(expected, rel=1e-4)
