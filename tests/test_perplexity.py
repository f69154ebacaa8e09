"""`llama-mp perplexity`: teacher-forced scoring of a text file in sliding windows, on any rank count.

Every token after the first is scored once, with the context its window gives it; the figure equals the
independent reference run on the same windows, and is the same on 1 and 2 ranks."""

import json
import math

import pytest
import torch

from llama_mp.errors import LlamaMPError
from llama_mp.tools.perplexity import Scores, agreement, windows
from multiproc import run_ranks
from reference import reference_logits
from workers import build, perplexity_report

TEXT = ("The quick brown fox jumps over the lazy dog. " * 3 + "Model parallel inference splits every layer "
        "across ranks, and each rank holds a slice of every weight matrix.")


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 2), (10, 4, 3), (10, 16, 8), (37, 8, 3), (9, 3, 1)])
def test_the_windows_score_every_target_once_with_context(n, window, stride):
    targets = []
    for begin, end, first in windows(n, window, stride):
        assert 0 <= begin < first < end <= n and end - begin <= window
        if targets:
            assert first - begin >= min(window - stride, first)  # the overlap is context
        targets += range(first, end)
    assert targets == list(range(1, n))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return str(path)


def reference_scores(state, args, tokens, window, stride):
    logprobs = []
    for begin, end, first in windows(len(tokens), window, stride):
        lp = torch.log_softmax(reference_logits(state, args, tokens[begin:end])[:-1], dim=-1)
        targets = torch.tensor(tokens[begin + 1:end])
        logprobs.append(lp.gather(-1, targets[:, None])[:, 0][first - begin - 1:])
    return torch.cat(logprobs)


@pytest.mark.spawn
def test_perplexity_equals_the_reference_on_1_and_2_ranks(make_checkpoint, tokenizer_path, text_file):
    ckpt_dir, args, state = make_checkpoint(shards=2)
    tokens = build(ckpt_dir, tokenizer_path).tokenizer.encode(TEXT, bos=True, eos=False)
    expected = reference_scores(state, args, tokens, 16, 5)
    one = perplexity_report(ckpt_dir, tokenizer_path, text_file, 16, 5)
    two = run_ranks(2, perplexity_report, ckpt_dir, tokenizer_path, text_file, 16, 5)
    assert one["scored"] == len(tokens) - 1 == expected.numel()
    assert one["perplexity"] == pytest.approx(math.exp(-expected.double().mean().item()), rel=1e-5)
    assert two[1] is None and two[0]["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)


def test_agreement_of_a_run_with_itself_is_perfect_and_of_different_runs_is_measured():
    a = Scores(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([3, 4, 5]))
    b = Scores(torch.tensor([-1.5, -2.0, -0.25]), torch.tensor([3, 9, 5]))
    assert agreement(a, a) == {"mean_abs_delta_logprob": 0.0, "greedy_agreement": 1.0}
    assert agreement(b, a) == pytest.approx({"mean_abs_delta_logprob": 0.25, "greedy_agreement": 2 / 3})
    with pytest.raises(LlamaMPError, match="different numbers of tokens"):
        agreement(a, Scores(a.logprobs[:2], a.argmax[:2]))


def test_the_command_prints_the_figure_and_compares_two_runs(make_checkpoint, tokenizer_path, text_file,
                                                             llama_mp_command, tmp_path):
    ckpt_dir, _, _ = make_checkpoint(shards=2)
    saved = str(tmp_path / "full.json")
    base = ["perplexity", "--ckpt_dir", ckpt_dir, "--tokenizer_path", tokenizer_path, "--text", text_file,
            "--max_seq_len", 32, "--device", "cpu", "--backend", "gloo", "--dtype", "float32"]
    code, out, err = llama_mp_command(*base, "--per_token", saved)
    assert code == 0, err
    assert out.startswith("perplexity ") and "windows of 32 tokens, stride 16" in out
    code, out, err = llama_mp_command(*base, "--decoder", "pytorch", "--compare", saved, "--json")
    assert code == 0, err
    report = json.loads(out)  # the same model through the other decoder: the same figures
    assert report["window"] == 32 and report["greedy_agreement"] == 1.0 and report["mean_abs_delta_logprob"] < 1e-4


@pytest.mark.parametrize("option,says", [(["--window", 64], "longer than --max_seq_len 32"),
                                         (["--window", 8, "--stride", 8], "not shorter than --window 8"),
                                         (["--text", "/nonexistent.txt"], "is not a file")])
def test_bad_options_are_one_message_before_loading(make_checkpoint, tokenizer_path, text_file, llama_mp_command,
                                                    option, says):
    ckpt_dir, _, _ = make_checkpoint(shards=2)
    args = ["perplexity", "--ckpt_dir", ckpt_dir, "--tokenizer_path", tokenizer_path, "--text", text_file,
            "--max_seq_len", 32, *option]
    code, out, err = llama_mp_command(*args)
    assert code == 2 and says in err and out == ""
