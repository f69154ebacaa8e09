"""The engine's rank protocol: rank 0 decides each piece of work and the other ranks run it, whether they
call the same methods (Meta's API) or wait in `serve()` for rank 0's requests (a server)."""

import pytest
from multiproc import run_ranks
from workers import PROMPTS, build, served_by_rank_0

pytestmark = pytest.mark.spawn  # every test here runs ranks in processes of their own


def test_ranks_serving_rank_0_run_its_requests_and_stop_when_told(make_checkpoint, tokenizer_path):
    ckpt_dir = make_checkpoint(shards=2)[0]
    alone = build(make_checkpoint(shards=1)[0], tokenizer_path, max_batch_size=len(PROMPTS))
    expected = [alone.text_completion(PROMPTS, max_gen_len=6, temperature=0),
                alone.chat_completion([[{"role": "user", "content": PROMPTS[0]}]], max_gen_len=3, temperature=0),
                "6 prompts were given"]
    main, other = run_ranks(2, served_by_rank_0, ckpt_dir, tokenizer_path)
    assert main == expected and other == "served"
