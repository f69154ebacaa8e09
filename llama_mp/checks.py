"""The rules for plain option values, each in one place: what counts as an integer, a number, a seed,
a number of seconds or a flag, and the message that says so when a value is none of them.

Values come from people (fire turns `--x 1e-300`, `--x nan`, `--x True` into Python values) and from
Python callers, so the rules refuse what would be accepted and then give nonsense (a temperature of
1e-300 turns the logits into inf and NaN) or end in a traceback deep inside torch (a seed of 2**64).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional

from .errors import LlamaMPError

SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes 64 bits
# A wait is a bound, not a wish: below a millisecond gloo rounds it to nothing, and a week is longer
# than any shard read or decode step (datetime.timedelta overflows near 3e6 years, thread waits sooner).
SHORTEST_WAIT_S, LONGEST_WAIT_S = 1e-3, 7 * 24 * 3600.0


class OptionError(LlamaMPError):
    """A value refused by a rule shared by several front ends; `option` is its plain name, for a server
    error's `param`."""

    def __init__(self, option: str, message: str):
        super().__init__(message)
        self.option = option


def is_number(value) -> bool:
    """An int or float, but not a bool (fire and JSON turn `--x True` into one)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def described(value) -> str:
    """`value` as a message shows it: its repr (cut short) and, unless that says it, its type."""
    text = repr(value)
    if is_int(value) and len(text) > 80:  # a number no one reads digit by digit
        return f"an integer of {len(text.lstrip('-'))} digits"
    if len(text) > 80:
        text = text[:77] + "..."
    if isinstance(value, (str, float)) or is_int(value):
        return text
    return f"{text} (a {type(value).__name__})"


def is_finite_number(value) -> bool:
    """A number that is neither NaN nor infinite. An int too big for a float is finite all the same."""
    return is_number(value) and (isinstance(value, int) or math.isfinite(value))


def require_int(name: str, value, least: int) -> int:
    """`value` if it is an integer >= `least`, else a LlamaMPError naming `name`."""
    if not is_int(value) or value < least:
        raise LlamaMPError(f"{name} must be an integer >= {least}, got {described(value)}.")
    return value


def require_number(name: str, value, low: float, high: float, why: str = "") -> float:
    """`value` if it is a finite number in [low, high], else a LlamaMPError naming `name`; `why` says
    what the range means."""
    if not is_finite_number(value) or not low <= value <= high:
        raise LlamaMPError(f"{name} must be a number from {low:g} to {high:g}{why}, got {described(value)}.")
    return value


def require_seed(name: str, value, limit: int = SEED_LIMIT) -> int:
    """`value` if it is an integer in [0, limit): by default what a random generator's seed can hold."""
    if not is_int(value) or not 0 <= value < limit:
        top = "2**64 - 1" if limit == SEED_LIMIT else str(limit - 1)
        raise LlamaMPError(f"{name} must be an integer from 0 to {top} (it seeds the random generator), "
                           f"got {described(value)}.")
    return value


def require_seconds(name: str, value) -> float:
    """`value` if it is a finite number of seconds a rank may wait, in [1 ms, one week]."""
    if not is_finite_number(value) or not SHORTEST_WAIT_S <= value <= LONGEST_WAIT_S:
        raise LlamaMPError(f"{name} must be a number of seconds from {SHORTEST_WAIT_S:g} to {LONGEST_WAIT_S:g} "
                           f"(one week), got {described(value)}. It bounds how long a rank waits for the others "
                           "before the job gives up.")
    return value


def require_bool(name: str, value) -> bool:
    """`value` if it is True or False: a flag given a number or a string is a mistake, not a wish."""
    if not isinstance(value, bool):
        raise LlamaMPError(f"{name} must be True or False, got {described(value)}.")
    return value


# ----------------------------------------------------------------------------------------------
# Text: what a shell or a file can hand over that is not Unicode text. Python turns bytes of argv that are
# not UTF-8 into lone surrogates (U+DC80..U+DCFF), and JSON's "\ud800" escapes make them too; such a
# string cannot be encoded, so the tokenizer or the first print would end in a UnicodeEncodeError.


def text_problem(value: str) -> Optional[str]:
    """What makes `value` not UTF-8 text (its first lone surrogate, and where), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"holds {value[e.start]!r} at character {e.start}, which is not text: bytes that are not UTF-8 "
                "(as a shell passes them on), or a lone surrogate escape such as \\ud800 in JSON")
    return None


def require_text(name: str, value) -> str:
    """`value` if it is a string of UTF-8-encodable text, else a LlamaMPError naming `name`."""
    if not isinstance(value, str):
        raise LlamaMPError(f"{name} must be text, got {described(value)}.")
    problem = text_problem(value)
    if problem:
        raise LlamaMPError(f"{name} {problem}. Pass UTF-8 text.")
    return value


# ----------------------------------------------------------------------------------------------
# JSON: one reader for everything a person or a client hands over as JSON (request bodies, dialog files,
# --prompts, params.json, config.json, --compare files). Python's own parser ends in a RecursionError on
# deep nesting, a ValueError on an integer of more than 4300 digits, and keeps the last of two fields of one
# name without a word; here each is a JsonProblem that says so.


class JsonProblem(ValueError):
    """Text that is not JSON this program reads. `reason` completes a sentence about the text ("is not valid
    JSON (...)"); `syntax` says it is not JSON at all; `field` names a field given twice."""

    def __init__(self, reason: str, syntax: bool = False, field: Optional[str] = None):
        super().__init__(reason)
        self.reason, self.syntax, self.field = reason, syntax, field


class _Repeated(Exception):
    pass


def _one_of_each(pairs):
    out = dict(pairs)
    if len(out) < len(pairs):
        seen: set = set()
        raise _Repeated(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def parse_json(text: str):
    """`text` as JSON, or a JsonProblem: not JSON (where it breaks), nested too deep for the parser, an integer
    of more than 4300 digits (Python's bound on reading digits), or an object naming a field twice (readers
    of JSON disagree on which one counts, so neither is taken)."""
    try:
        return json.loads(text, object_pairs_hook=_one_of_each)
    except _Repeated as e:
        raise JsonProblem(f"names the field {e.args[0]!r} twice in one object; give it once (which one counts "
                          "is up to each reader of JSON)", field=e.args[0]) from None
    except RecursionError:
        raise JsonProblem("is nested deeper than this program reads") from None
    except ValueError as e:
        if "integer string conversion" in str(e):
            raise JsonProblem("holds an integer of more than 4300 digits, which no field takes") from None
        raise JsonProblem(f"is not valid JSON ({e})", syntax=True) from None


def parse_json_bytes(raw: bytes):
    """`raw` as UTF-8 JSON (`parse_json`); bytes that are not UTF-8 are a JsonProblem naming the first."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise JsonProblem(f"is not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start} cannot start or "
                          "continue a character)") from None
    return parse_json(text)


def read_json_file(path: str):
    """The JSON in the file `path` (`parse_json_bytes`); an OSError is the caller's to word."""
    with open(path, "rb") as f:
        return parse_json_bytes(f.read())


def read_json_input(path, option: str, name: str, holds: str):
    """The JSON of the input file `path` that `option` names (--dialogs, --tools), or a LlamaMPError that
    says what is wrong with it: not a path, no such file, not JSON (then what it should hold: `holds`),
    unreadable. `name` starts the messages ("Dialogs file")."""
    if not isinstance(path, str):
        raise LlamaMPError(f"{option} must be the path of a JSON file, got {described(path)}.")
    if not os.path.isfile(path):
        raise LlamaMPError(f"{name} {path!r} does not exist.")
    try:
        return read_json_file(path)
    except JsonProblem as e:
        raise LlamaMPError(f"{name} {path!r} {e.reason}. It should hold {holds}.") from None
    except OSError as e:
        raise LlamaMPError(f"{name} {path!r} cannot be read ({e.strerror or e}).") from None


# ----------------------------------------------------------------------------------------------
# The domain of every numeric option of every command and launcher, in one table. Each count, size and
# rate has an upper bound as well as a lower one, checked before any work: a user's 10**12 must not become
# a loop up to it, an allocation, an overflow traceback or a run that fills the machine. Finer rules that
# depend on other values (a rank count that splits the model, a window within max_seq_len, the memory the
# model and its cache need, temperature 0 or from 0.001) are checked where those values are known.

MAX_RANKS = 1024             # processes, shards, GPUs: more than any LLaMA has query heads to split
MAX_TOKENS = 1 << 24         # sequence lengths and token counts: 16M, over 100x the longest LLaMA context
MAX_BATCH = 1 << 16          # rows of a batch
MAX_SIZE = 2 ** 31 - 1       # a tensor dimension (params.py's LARGEST_SIZE)
MAX_RUNS = 1000              # repetitions of a benchmark
MAX_CLIENTS = 1024           # concurrent benchmark clients (each an open connection)
MAX_REQUESTS = 1 << 20       # requests of a benchmark level


@dataclass(frozen=True)
class Domain:
    """The values an option may take: integers (`integer`) or finite numbers from `low` to `high`."""

    integer: bool
    low: float
    high: float
    meaning: str

    def check(self, name: str, value, spelled: str = "--{}") -> None:
        """Refuse `value` of option `name` (written as `spelled` spells it: "--{}" on the command line,
        "'{}'" in a server request) unless it is in this domain; the message names both bounds exactly."""
        ok = is_int(value) if self.integer else is_finite_number(value)
        if not ok or not self.low <= value <= self.high:
            kind = "an integer" if self.integer else "a number"
            raise OptionError(name, f"{spelled.format(name)} must be {kind} from {self.shown(self.low)} to "
                                    f"{self.shown(self.high)} ({self.meaning}), got {described(value)}.")

    def shown(self, bound: float) -> str:
        # an integer bound exactly (16777216, not 1.67772e+07: a rounded bound names a value that is not it)
        return str(int(bound)) if self.integer else f"{bound:g}"


def _int(low, high, meaning):
    return Domain(True, low, high, meaning)


def _number(low, high, meaning):
    return Domain(False, low, high, meaning)


# Keys are option names, or "command:option" where one command's option means something else.
OPTION_DOMAINS: Dict[str, Domain] = {
    "mp": _int(1, MAX_RANKS, "shards to write"),
    "gpus": _int(1, MAX_RANKS, "GPUs to split the model over"),
    "gpu_mem_gb": _number(0.001, 65536, "GiB of memory per GPU"),
    "max_seq_len": _int(2, MAX_TOKENS, "tokens of prompt and answer a sequence holds"),
    "max_batch_size": _int(1, MAX_BATCH, "sequences decoded together"),
    "max_gen_len": _int(1, MAX_TOKENS, "tokens to generate"),
    "temperature": _number(0, 100, "0 for greedy, else from 0.001"),
    "top_p": _number(0, 1, "the nucleus's probability mass, above 0"),
    "top_k": _int(0, MAX_SIZE, "likeliest tokens kept, 0 for all"),
    "seed": _int(0, SEED_LIMIT - 1, "it seeds the random generator"),
    "bench:seed": _int(0, 2 ** 32 - 1, "it picks the prompts and the random weights"),
    "synth:seed": _int(0, 2 ** 32 - 1, "it draws the random weights"),
    "timeout_s": _number(SHORTEST_WAIT_S, LONGEST_WAIT_S, "seconds a rank waits for the others"),
    "load_timeout_s": _number(SHORTEST_WAIT_S, LONGEST_WAIT_S, "seconds a rank waits for the slowest to load"),
    "group_size": _int(0, 128, "inputs per int4 scale: 32, 64 or 128"),
    "window": _int(2, MAX_TOKENS, "tokens per scoring window"),
    "stride": _int(1, MAX_TOKENS, "tokens each window advances"),
    # model shapes (synth, bench): params.json's own rules then apply
    "dim": _int(1, MAX_SIZE, "the model width"),
    "n_layers": _int(1, MAX_SIZE, "transformer layers"),
    "n_heads": _int(1, MAX_SIZE, "query heads"),
    "n_kv_heads": _int(1, MAX_SIZE, "key/value heads"),
    "vocab_size": _int(1, MAX_SIZE, "token embeddings"),
    "synth:vocab_size": _int(0, MAX_SIZE, "token embeddings, 0 for the tokenizer's size"),
    "multiple_of": _int(1, MAX_SIZE, "the FFN width is rounded up to a multiple of it"),
    "ffn_dim_multiplier": _number(0.001, 1000, "it scales the FFN width, e.g. 1.3"),
    # bench
    "batch": _int(1, MAX_BATCH, "sequences decoded together"),
    "prompt_len": _int(1, MAX_TOKENS, "tokens per prompt"),
    "new_tokens": _int(1, MAX_TOKENS, "tokens decoded per run"),
    "runs": _int(1, MAX_RUNS, "timed runs"),
    "warmup": _int(0, MAX_RUNS, "untimed runs first"),
    # serve
    "port": _int(0, 65535, "0 for any free port"),
    "max_queue": _int(1, MAX_BATCH, "requests that may wait for a free row"),
    "max_body_bytes": _int(1024, 1 << 30, "bytes of one request body"),
    "drain_s": _number(0, 3600, "seconds in-flight requests get to finish after SIGTERM"),
    "prefix_cache_rows": _int(0, MAX_BATCH, "free cache rows that keep their tokens for a later prompt, 0 for none"),
    "receive_timeout_s": _number(0.1, 3600, "seconds a request's head, then its body, may take to arrive"),
    # bench-serve (its --concurrency is a list, checked by parse_levels with the same bound)
    "bench_serve:requests": _int(0, MAX_REQUESTS, "requests per level, 0 for 64 or 8 per client"),
    "bench_serve:max_tokens": _int(1, MAX_TOKENS, "tokens per answer"),
    "bench_serve:warmup": _int(0, MAX_REQUESTS, "uncounted requests first"),
}


def option_domain(command: str, name: str) -> Optional[Domain]:
    """The domain of option `name` of `command` (a function's name), or None for an option that is not a number."""
    return OPTION_DOMAINS.get(f"{command}:{name}", OPTION_DOMAINS.get(name))


def check_option_values(command: str, values: Dict[str, object]) -> None:
    """Refuse the first value of `values` (option name -> value as given) outside its domain; None means
    "not given" for an optional option."""
    for name, value in values.items():
        domain = option_domain(command, name)
        if domain is not None and value is not None:
            domain.check(name, value)
