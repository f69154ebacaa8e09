"""Tokenizer wrapper and streaming decode."""

import re

import pytest

from llama_mp import LlamaMPError
from llama_mp.runtime.tokenizer import TextStream, Tokenizer


def test_llama_special_ids_and_round_trip(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    assert tokenizer.family == "llama" and not tokenizer.byte_level and tokenizer.stop_ids == [2]
    assert (tokenizer.special_id("<s>"), tokenizer.special_id("</s>")) == (1, 2)
    with pytest.raises(LlamaMPError, match=re.escape("no special token '<|eot_id|>'")):
        tokenizer.special_id("<|eot_id|>")
    ids = tokenizer.encode("Hello world", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "Hello world"


@pytest.mark.parametrize("text", ["Hello, world! Streaming works.",
                                  "日本語のテキスト and café 🙂 mixed",
                                  "line one\nline two\n  indented " + "word " * 30])
def test_streaming_prints_exactly_the_decoded_text_and_never_half_a_character(tokenizer, text):
    ids = tokenizer.encode(text, bos=False, eos=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_missing_or_invalid_tokenizer_file_is_explained(tmp_path):
    with pytest.raises(LlamaMPError, match="does not exist"):
        Tokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(LlamaMPError, match="not a SentencePiece model .* nor a tiktoken BPE file"):
        Tokenizer(str(bad))
