"""Device-clean code (issue 21, item 3), checked on a CPU.

1. Every sampling path (the sampling function, the engine's token choice, the server scheduler's) draws
   with a generator on the device of the logits it samples. A CUDA draw with a CPU generator fails
   ("Expected a 'cuda' device type for generator"); here the logits are on the "meta" device, generators
   asked for on it are stand-ins (torch makes none there), and every random draw of torch checks the
   generator it is given against the device it draws into.
2. Generation, continuous batching and the server's batch loop run a real model with
   `torch.set_default_device("meta")` around them: a tensor made without naming its device lands on
   "meta", where mixing it with the model's tensors or reading it on the host fails loudly.
"""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from llama_mp import distributed
from llama_mp.runtime import sampling
from llama_mp.runtime.batching import Admission, Batcher, Plan, StepResult
from llama_mp.runtime.engine import Engine, Request
from llama_mp.runtime.sampling import Choice, RowSampling
from llama_mp.server.protocol import SequenceSpec
from llama_mp.server.scheduler import Scheduler
from scheduling import run_to_end

META = torch.device("meta")
VOCAB = 50
REAL_GENERATOR = torch.Generator


class StandInGenerator:
    """What `torch.Generator(device=d)` gives for a device torch has no generator for (here: "meta")."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.seed = None

    def manual_seed(self, seed):
        self.seed = seed
        return self

    def initial_seed(self):
        return self.seed


# torch's random draws that take a generator: (name, where the drawn values go: the device argument of
# a factory, or the tensor argument the values are drawn for / written into)
FACTORIES = ("rand", "randn", "randint", "randperm")
FROM_TENSOR = ("multinomial", "bernoulli", "normal", "poisson", "rand_like", "randn_like", "randint_like")
IN_PLACE = ("exponential_", "uniform_", "normal_", "random_", "geometric_", "cauchy_", "log_normal_",
            "bernoulli_")


@pytest.fixture
def draws(monkeypatch):
    """Every random draw from here on, as (the generator's device, the device drawn on); a draw whose
    generator is on another device than its values fails the test where it happens."""
    seen = []

    class Making(type):  # torch.Generator stays a type: torch itself checks isinstance against it
        def __call__(cls, device="cpu"):
            device = torch.device(device)
            return REAL_GENERATOR(device) if device.type == "cpu" else StandInGenerator(device)

        def __instancecheck__(cls, obj):
            return isinstance(obj, (REAL_GENERATOR, StandInGenerator))

    class Generator(metaclass=Making):
        pass

    def check(generator, target):
        target = torch.device(target)
        seen.append((generator.device, target))
        assert generator.device == target, f"a draw on {target} with a generator on {generator.device}"

    def wrap(real, target_of):
        def drawing(*args, generator=None, **kwargs):
            if generator is None:
                return real(*args, **kwargs)
            check(generator, target_of(args, kwargs))
            if isinstance(generator, StandInGenerator):  # torch cannot draw with it: the values do not matter
                return real(*args, **kwargs)
            return real(*args, generator=generator, **kwargs)
        return drawing

    monkeypatch.setattr(torch, "Generator", Generator)
    for name in FACTORIES:
        monkeypatch.setattr(torch, name, wrap(getattr(torch, name),
                                              lambda a, k: k.get("device") or torch.get_default_device()))
    for name in FROM_TENSOR:
        if hasattr(torch, name):
            monkeypatch.setattr(torch, name, wrap(getattr(torch, name), lambda a, k: a[0].device))
    for name in IN_PLACE:
        monkeypatch.setattr(torch.Tensor, name, wrap(getattr(torch.Tensor, name), lambda a, k: a[0].device))
    return seen


def drawn_on(seen, device):
    return [target for _, target in seen if target == device]


def test_make_generator_draws_like_a_seeded_generator_on_that_device():
    g = sampling.make_generator("cpu", 5)
    assert g.device == torch.device("cpu") and g.initial_seed() == 5
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.8, 1.0, 0), (0.8, 0.9, 0), (1.0, 1.0, 5), (0.7, 0.5, 3)])
def test_sample_draws_with_the_generator_it_is_given_on_the_logits_device(draws, temperature, top_p, top_k):
    logits = torch.randn(3, VOCAB, device=META)
    ids = sampling.sample(logits, temperature, top_p, top_k, sampling.make_generator(META, 3))
    assert ids.device == META and ids.shape == (3,)
    assert drawn_on(draws, META), "sample drew nothing with its generator"


class LogitsModel:
    """The engine's side of a model, on "meta": logits for the last hidden states, and one rank's
    broadcast (the tensor itself)."""

    max_batch_size, max_seq_len = 4, 32
    args = SimpleNamespace(vocab_size=VOCAB)

    def __init__(self):
        self.comm = SimpleNamespace(broadcast_from_main_=lambda t: t)

    def logits(self, h):
        return torch.randn(h.shape[0], h.shape[1], VOCAB, device=h.device)


def test_the_engines_sampling_draws_on_the_models_device(draws):
    group = SimpleNamespace(device=META, is_main=True, rank=0, world_size=1)
    engine = Engine(LogitsModel(), group, stop_ids=[2], seed=4)
    assert engine.generator.device == META
    step = engine.next_token(torch.zeros(2, 1, 8, device=META), Request([[1, 5], [1, 6]], 4, temperature=0.8)).ids
    assert step.device == META
    assert drawn_on(draws, META), "the engine drew nothing with its generator"


class MetaBatcher:
    """A Batcher stand-in whose model is on "meta": each step, `choose` gets meta logits for every row; each
    row then ends with the stop token (the values of the draw cannot be read on meta, nor do they matter)."""

    device, slots = META, 2

    def __init__(self, stop_id):
        self.stop_id, self.rows, self.chosen = stop_id, [], []

    def run(self, plan, sampling_of) -> StepResult:
        slots = sorted({*self.rows, *(a.slot for a in plan.admit)} - set(plan.release))
        self.rows = slots
        ids = sampling.choose_from_logits(torch.randn(len(slots), VOCAB, device=META), sampling_of(slots)).ids
        self.chosen.append((ids.device, tuple(ids.shape)))
        return StepResult(slots, Choice(torch.full((len(slots),), self.stop_id, device="cpu")))

    def pause(self):
        pass


def test_the_servers_sampled_and_greedy_requests_draw_on_the_models_device(draws, tokenizer):
    """The crash at the first sampled server request on a GPU, on CPU terms: a sampled and a greedy request
    in one step of a model on "meta"."""
    batcher = MetaBatcher(tokenizer.eos_id)
    scheduler = Scheduler(batcher, tokenizer, max_queue=4)
    prompt = tokenizer.encode("Hello", bos=True, eos=False)
    specs = [SequenceSpec(prompt, 4, temperature, 1.0, seed, [], None) for temperature, seed in ((0.9, 7), (0, None))]
    seqs, _ = run_to_end(scheduler, specs, 30)
    assert [s.generator.device for s in seqs] == [META, META]
    # two steps: the loop queues the second before it reads the first's tokens (stop tokens, which end both)
    assert batcher.chosen == [(META, (2,))] * 2
    assert drawn_on(draws, META), "the sampled request drew nothing with its generator"


# --- 2. Generation, batching and the server loop with "meta" as the default device ----------------------


@contextlib.contextmanager
def meta_by_default():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


DECODERS = ["pytorch", "static", "cpu_kernels"]


@pytest.fixture(scope="module", params=DECODERS)
def built(request, make_checkpoint, tokenizer_path):
    from llama_mp import Llama
    from llama_mp.kernels import cpu

    if request.param == "cpu_kernels" and cpu.library() is None:
        pytest.skip("the CPU kernels are not built here")
    ckpt_dir = make_checkpoint(n_kv_heads=2)[0]
    llama = Llama.build(ckpt_dir, tokenizer_path, 40, 3, seed=3, backend="gloo", device="cpu", decoder=request.param)
    yield llama
    distributed.teardown()


def test_generation_makes_every_tensor_on_the_models_device(built):
    """The same results as without the meta default (sampling reseeded alike), so nothing went elsewhere."""
    llama = built
    prompts = [llama.tokenizer.encode(p, bos=True, eos=False) for p in ("The quick brown fox", "Once upon")]

    def everything(streamed):
        llama.engine.generator.manual_seed(9)
        return (llama.generate(prompts, 6, temperature=0),
                llama.generate(prompts, 6, temperature=0.8, top_p=0.9, top_k=20, on_token=streamed.append),
                llama.generate(prompts, 4, temperature=0, logprobs=True, echo=True),
                llama.text_completion(["Hello"], max_gen_len=4, temperature=0),
                llama.engine.score(prompts[0]))

    expected = everything([])
    streamed = []
    with meta_by_default():
        got = everything(streamed)
    assert got[:4] == expected[:4]
    assert all(torch.equal(a, b) for a, b in zip(got[4], expected[4]))
    assert streamed and all(t.device.type == "cpu" for t in streamed)


def test_continuous_batching_makes_every_tensor_on_the_models_device(built):
    llama = built
    batcher = Batcher(llama.engine)
    short = tuple(llama.tokenizer.encode("Model parallel", bos=True, eos=False))
    long = tuple(range(3, 3 + 30))  # longer than any step's room: prefilled on its own
    plans = [Plan(admit=(Admission(0, short),), gather=False),
             Plan(admit=(Admission(1, long, score_top=2), Admission(2, short)), gather=True),
             Plan(release=(0,), gather=False),
             Plan(admit=(Admission(0, short, score_top=0),), gather=True)]

    def run_all():
        batcher = Batcher(llama.engine)
        try:
            return [batcher.run(plan, lambda slots: [RowSampling(0.0)] * len(slots)).on_host() for plan in plans]
        finally:
            batcher.pause()

    expected = run_all()
    with meta_by_default():
        got = run_all()
    assert [(r.slots, r.tokens) for r in got] == [(r.slots, r.tokens) for r in expected]
    assert [sorted(r.slots) for r in got] == [[0], [0, 1, 2], [1, 2], [0, 1, 2]]
    for r, e in zip(got, expected):
        assert sorted(r.prompt_scores) == sorted(e.prompt_scores)
        for slot, scores in r.prompt_scores.items():
            assert all(torch.equal(getattr(scores, f), getattr(e.prompt_scores[slot], f))
                       for f in ("logprobs", "top_logprobs", "top_ids"))
    assert set(got[1].prompt_scores) == {1} and set(got[3].prompt_scores) == {0}


def test_the_servers_batch_loop_makes_every_tensor_on_the_models_device(built):
    llama = built
    scheduler = Scheduler(Batcher(llama.engine), llama.tokenizer, max_queue=8, seed=5)
    prompt = llama.tokenizer.encode("Hello there", bos=True, eos=False)
    specs = [SequenceSpec(prompt, 5, 0.9, 0.95, 11, [], None, ignore_eos=True),           # sampled
             SequenceSpec(prompt, 5, 0, 1.0, None, [], None, ignore_eos=True),            # greedy
             SequenceSpec(prompt, 3, 0, 1.0, None, [], 2, ignore_eos=True, echo=True),     # scored, logprobs
             SequenceSpec(prompt, 4, 1.0, 1.0, None, [], None, ignore_eos=True)]          # sampled, seed drawn
    _, events = run_to_end(scheduler, specs, 60, around=meta_by_default)
    finished = {e.index: e for e in events if e.finish_reason is not None}
    assert sorted(finished) == [0, 1, 2, 3] and not any(e.error for e in events), [e.error for e in events]
    assert [finished[i].completion_tokens for i in range(4)] == [5, 5, 3, 4]
    assert scheduler.counts["finished"] == 4
